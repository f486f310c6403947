"""The `collective` weight transport across real processes (Ray actors, gloo on 127.0.0.1):
bit-identical bucketed broadcast, epoch rebuilds with changing membership, loud layout mismatch,
timeouts, and coexistence with the sender's own default process group (as on learner rank 0)."""

import itertools
import socket
import time

import pytest
import torch

from danceopd.collective import LayoutMismatchError, WeightSyncError

pytestmark = pytest.mark.ray

BUCKET = 16 * 1024  # small, so the state below needs many buckets and one tensor spans several
_epochs = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(100, 200, generator=g)  # 80 KB > BUCKET
    big[0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])  # bit-identical, not just equal
    return {
        "net.big.weight": big,
        "net.bias": torch.randn(17, generator=g),
        "emb": torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        "half": torch.randn(2, 3, generator=g).half(),
        "steps": torch.randint(0, 1 << 40, (4,), generator=g),
        "mask": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


def like_of(state: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def assert_bit_identical(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


@pytest.fixture(scope="module")
def peers(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Peer:
        def __init__(self):
            from danceopd.collective import BucketBroadcaster

            self.group, self.bb = None, BucketBroadcaster()

        def init_default_pg(self, port):
            # What DeepSpeed does on learner rank 0: a default group of its own.
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            return dist.get_world_size()

        def default_pg_ok(self):
            import torch.distributed as dist

            t = torch.ones(2)
            dist.all_reduce(t)
            return dist.is_initialized() and dist.get_world_size() == 1 and t.tolist() == [1.0, 1.0]

        def join(self, port, rank, world, epoch, timeout_s=10.0):
            from danceopd.collective import make_group

            if self.group is not None:
                self.group.close()
            self.group = make_group("gloo", "127.0.0.1", port, rank, world, epoch, timeout_s)
            return rank

        def send(self, state, version):
            return self.bb.send(self.group, state, version, bucket_bytes=BUCKET), self.bb.last_buckets

        def recv(self, like):
            return self.bb.recv(self.group, like)

    sender, *receivers = [Peer.remote() for _ in range(3)]
    assert ray.get(sender.init_default_pg.remote(free_port())) == 1
    yield ray, sender, receivers
    assert ray.get(sender.default_pg_ok.remote())  # the weight groups never touched it
    for a in (sender, *receivers):
        ray.kill(a)


def join(ray, sender, receivers, timeout_s=10.0):
    port, epoch, world = free_port(), next(_epochs), len(receivers) + 1
    got = ray.get([p.join.remote(port, rank, world, epoch, timeout_s) for rank, p in enumerate([sender, *receivers])])
    assert got == list(range(world))


def sync(ray, sender, receivers, state, version, likes=None):
    likes = likes or [like_of(state)] * len(receivers)
    sent = sender.send.remote(state, version)
    got = [r.recv.remote(like) for r, like in zip(receivers, likes)]
    return sent, got


def test_bucketed_broadcast_is_bit_identical_and_groups_rebuild(peers):
    ray, sender, receivers = peers
    t0 = time.time()
    # Epoch: sender + 2 receivers, two versions in a row on the same group.
    join(ray, sender, receivers)
    for version, seed in ((3, 0), (4, 1)):
        state = make_state(seed)
        sent, got = sync(ray, sender, receivers, state, version)
        nbytes, nbuckets = ray.get(sent)
        assert nbytes == sum(t.numel() * t.element_size() for t in state.values())
        assert nbuckets > 5  # the big tensor alone is 5 buckets
        for v, out in ray.get(got):
            assert v == version
            assert_bit_identical(out, state)
    # Membership changes: a new epoch with one receiver (the other "left").
    join(ray, sender, receivers[:1])
    state = make_state(2)
    sent, got = sync(ray, sender, receivers[:1], state, 5)
    ray.get(sent)
    (v, out), = ray.get(got)
    assert v == 5
    assert_bit_identical(out, state)
    assert time.time() - t0 < 30


def test_mismatched_model_fails_loudly_on_every_rank(peers):
    ray, sender, receivers = peers
    join(ray, sender, receivers)
    state = make_state(3)
    wrong = like_of(state)
    wrong["net.bias"] = torch.zeros(18)
    wrong["extra"] = torch.zeros(1)
    sent, (ok, bad) = sync(ray, sender, receivers, state, 7, likes=[like_of(state), wrong])
    with pytest.raises(LayoutMismatchError, match="1 of 2 receivers"):
        ray.get(sent)
    with pytest.raises(LayoutMismatchError, match=r"rank 2.*does not match.*not sent: extra.*net\.bias: here \[18\]"):
        ray.get(bad)
    with pytest.raises(LayoutMismatchError, match="other receiver.*unchanged"):
        ray.get(ok)
    # Nobody was left half-way: the same group carries the next (matching) version.
    sent, got = sync(ray, sender, receivers, state, 8)
    ray.get(sent)
    for v, out in ray.get(got):
        assert v == 8
        assert_bit_identical(out, state)


def test_missing_receiver_times_out_instead_of_hanging(peers):
    ray, sender, receivers = peers
    join(ray, sender, receivers[:1], timeout_s=2.0)
    t0 = time.time()
    with pytest.raises(WeightSyncError, match="timed out"):
        ray.get(sender.send.remote(make_state(4), 9))  # the receiver never calls recv
    assert time.time() - t0 < 10
    with pytest.raises(WeightSyncError, match="closed"):  # a failed group is not reused by accident
        ray.get(sender.send.remote(make_state(4), 10))
