"""The `collective` weight transport: learner rank 0 broadcasts the student's trainable weights to
every rollout worker over torch.distributed (gloo on CPU, NCCL on GPU), in buckets.

Why a standalone group: learner rank 0 already owns the default process group (DeepSpeed's, the
learner ranks only) and rollout workers own none. The weight group is its own TCPStore plus a bare
gloo/NCCL backend object: nothing is registered in torch.distributed's global state, so it can
neither clash with the default group nor need one. Membership changes (workers restart, the fleet
scales), so a group lives for one *epoch* — sender (rank 0) + the receivers of that moment — and is
rebuilt, on a fresh port, when membership changes.

Every blocking step is bounded by the group's timeout, so a missing peer raises instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

MiB = 1 << 20
_MAGIC = 0x44414E4345  # "DANCE": a header from anything else fails loudly
_HEADER = 6  # magic, version, n_tensors, total_bytes, layout checksum, bucket_bytes


class WeightSyncError(RuntimeError):
    """A weight broadcast failed (peer missing, timeout, broken group). Rebuild the group."""


class LayoutMismatchError(WeightSyncError):
    """Sender and a receiver disagree on keys/shapes/dtypes. Raised on every rank; nothing is written."""


@dataclass
class WeightGroup:
    """One epoch's group. Keep it alive while used: dropping it closes the store (rank 0 hosts it)."""

    backend: object  # ProcessGroupGloo / ProcessGroupNCCL, used directly (not registered globally)
    store: object
    rank: int
    world_size: int
    epoch: int
    timeout: timedelta
    device: torch.device
    _published: set = field(default_factory=set)

    def close(self, abort: bool = False) -> None:
        # abort after a failure (NCCL may have work in flight); shutdown otherwise.
        try:
            (self.backend.abort if abort else self.backend.shutdown)()
        except Exception:  # best effort: the group is discarded either way
            pass
        self.backend = self.store = None


def make_group(backend: str, store_addr: str, store_port: int, rank: int, world_size: int, epoch: int,
               timeout_s: float) -> WeightGroup:
    """Join the weight group of `epoch`. All `world_size` members must call it concurrently (it
    blocks until everyone has connected, at most `timeout_s`). Rank 0 is the sender and hosts the
    TCPStore on `store_addr:store_port` (a free port on its node, distinct from DeepSpeed's)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"weight group: rank {rank} not in [0, {world_size})")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight group: unknown backend {backend!r} (gloo or nccl)")
    timeout = timedelta(seconds=timeout_s)
    try:
        tcp = dist.TCPStore(store_addr, store_port, world_size, is_master=(rank == 0), timeout=timeout,
                            wait_for_workers=True)
        # The prefix keeps keys of different epochs apart should a store ever be shared.
        store = dist.PrefixStore(f"danceopd-weights-{epoch}/", tcp)
        if backend == "gloo":
            # Same construction as torch's own init_process_group (GLOO_SOCKET_IFNAME is honoured).
            pg = dist.ProcessGroupGloo(store, rank, world_size, timeout=timeout)
            device = torch.device("cpu")
        else:
            if not dist.is_nccl_available() or not torch.cuda.is_available():
                raise WeightSyncError("weight group: backend 'nccl' needs CUDA and a NCCL-enabled torch")
            opts = dist.ProcessGroupNCCL.Options()
            # NCCL's watchdog may kill the whole process when a collective exceeds this (on the
            # learner!), so give it slack: our own wait(timeout) fires first and aborts the group.
            opts._timeout = 2 * timeout + timedelta(seconds=30)
            opts.is_high_priority_stream = False
            pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
            device = torch.device("cuda", torch.cuda.current_device())
    except WeightSyncError:
        raise
    except Exception as e:  # store/rendezvous timeout: name the epoch and rank
        raise WeightSyncError(f"weight group epoch {epoch}: rank {rank}/{world_size} could not join "
                              f"{store_addr}:{store_port} within {timeout_s}s: {e}") from e
    return WeightGroup(pg, store, rank, world_size, epoch, timeout, device)  # store keeps tcp alive


def layout(state: dict[str, torch.Tensor]) -> list[tuple[str, list[int], str]]:
    """Keys, shapes, dtypes in a canonical order (sorted keys: dict order may differ per side)."""
    return [(k, list(state[k].shape), str(state[k].dtype).removeprefix("torch.")) for k in sorted(state)]


def layout_checksum(lay: list) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(lay).encode()).digest()[:8], "little") & (2**63 - 1)


def _buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[tuple[torch.dtype, list]]:
    """Plan: per dtype, the tensors' flat elements as one stream cut into buckets of at most
    bucket_bytes; a tensor bigger than a bucket spans several. Each bucket is (dtype, [(key, start,
    stop)]). Both sides compute it from the same (checksum-verified) layout and bucket_bytes."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k in sorted(state):
        by_dtype.setdefault(state[k].dtype, []).append(k)
    plan = []
    for dtype in sorted(by_dtype, key=str):
        cap = max(1, bucket_bytes // torch.empty((), dtype=dtype).element_size())
        cur, used = [], 0
        for k in by_dtype[dtype]:
            start, n = 0, state[k].numel()
            while start < n:
                take = min(n - start, cap - used)
                cur.append((k, start, start + take))
                start, used = start + take, used + take
                if used == cap:
                    plan.append((dtype, cur))
                    cur, used = [], 0
        if cur:
            plan.append((dtype, cur))
    return plan


def _live(group: WeightGroup) -> WeightGroup:
    if group.backend is None:
        raise WeightSyncError(f"weight group epoch {group.epoch} is closed (after a failure?): rebuild it")
    return group


def _wait(group: WeightGroup, work, what: str) -> None:
    try:
        work.wait(group.timeout)  # a timeout makes even NCCL block the CPU and raise, not hang
    except Exception as e:
        # Peers are now out of step (some saw the op, some did not): the group is unusable.
        group.close(abort=True)
        raise WeightSyncError(f"weight group epoch {group.epoch}, rank {group.rank}/{group.world_size}: "
                              f"{what} failed or timed out after {group.timeout.total_seconds()}s: {e}") from e


def _diff(mine: list, theirs: list, limit: int = 5) -> str:
    a, b = {k: (s, d) for k, s, d in mine}, {k: (s, d) for k, s, d in theirs}
    out = [f"missing here: {k}" for k in sorted(b.keys() - a.keys())]
    out += [f"not sent: {k}" for k in sorted(a.keys() - b.keys())]
    out += [f"{k}: here {a[k][0]} {a[k][1]}, sender {b[k][0]} {b[k][1]}" for k in sorted(a.keys() & b.keys())
            if a[k] != b[k]]
    return "; ".join(out[:limit]) + (f"; ... {len(out) - limit} more" if len(out) > limit else "")


class BucketBroadcaster:
    """Rank 0 `send`s, the others `recv`. Per sync: header broadcast, one tiny all-reduce so every
    rank learns whether any receiver's layout differs (then all raise, nothing is written), then
    one broadcast per bucket. `last_bytes` / `last_buckets` describe the latest call."""

    def __init__(self):
        self.last_bytes = 0
        self.last_buckets = 0

    def _agree(self, group: WeightGroup, mismatch: int) -> int:
        flag = torch.tensor([mismatch], dtype=torch.int64, device=group.device)
        _wait(group, group.backend.allreduce([flag]), "layout check")
        return int(flag.item())

    def send(self, group: WeightGroup, state: dict[str, torch.Tensor], version: int,
             bucket_bytes: int = 32 * MiB) -> int:
        """Broadcast `state` as `version`; returns payload bytes sent."""
        if _live(group).rank != 0:
            raise ValueError("weight group: only rank 0 sends")
        lay = layout(state)
        checksum = layout_checksum(lay)
        if checksum not in group._published:  # receivers read it only to explain a mismatch
            group.store.set(f"layout/{checksum}", json.dumps(lay))
            group._published.add(checksum)
        total = sum(t.numel() * t.element_size() for t in state.values())
        header = torch.tensor([_MAGIC, version, len(state), total, checksum, bucket_bytes], dtype=torch.int64,
                              device=group.device)
        _wait(group, group.backend.broadcast(header, 0), "header broadcast")
        bad = self._agree(group, 0)
        if bad:
            raise LayoutMismatchError(
                f"weight group epoch {group.epoch}: {bad} of {group.world_size - 1} receivers hold a model "
                f"whose keys/shapes/dtypes differ from the sender's ({len(state)} tensors); version {version} "
                f"was not sent (see the receivers' errors for the differences)")
        flat = {k: t.detach().reshape(-1) for k, t in state.items()}
        plan = _buckets(state, bucket_bytes)
        for i, (dtype, segs) in enumerate(plan):
            buf = torch.empty(sum(b - a for _, a, b in segs), dtype=dtype, device=group.device)
            off = 0
            for k, a, b in segs:
                buf[off:off + b - a].copy_(flat[k][a:b])
                off += b - a
            # Bytes on the wire: every backend broadcasts uint8, whatever the dtype (bool, bf16, ...).
            _wait(group, group.backend.broadcast(buf.view(torch.uint8), 0), f"bucket {i + 1}/{len(plan)}")
        self.last_bytes, self.last_buckets = total, len(plan)
        return total

    def recv(self, group: WeightGroup, like: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        """Receive one version. Returns (version, state): new contiguous tensors with the keys, shapes,
        dtypes and devices of `like` (never written into `like`, so a failure mid-transfer leaves the
        worker's model intact; apply with load_state_dict between batches)."""
        if _live(group).rank == 0:
            raise ValueError("weight group: rank 0 sends, it does not receive")
        header = torch.zeros(_HEADER, dtype=torch.int64, device=group.device)
        _wait(group, group.backend.broadcast(header, 0), "header broadcast")
        magic, version, n, total, checksum, bucket_bytes = (int(x) for x in header.tolist())
        if magic != _MAGIC:
            group.close(abort=True)
            raise WeightSyncError(f"weight group epoch {group.epoch}: bad header magic {magic:#x}")
        lay = layout(like)
        mismatch = int(checksum != layout_checksum(lay))
        bad = self._agree(group, mismatch)
        if mismatch:
            theirs = json.loads(group.store.get(f"layout/{checksum}").decode())
            raise LayoutMismatchError(
                f"weight group epoch {group.epoch}, rank {group.rank}: this worker's model ({len(like)} tensors) "
                f"does not match the sender's ({n} tensors): {_diff(lay, theirs)}; version {version} not applied")
        if bad:
            raise LayoutMismatchError(
                f"weight group epoch {group.epoch}, rank {group.rank}: {bad} other receiver(s) hold a mismatched "
                f"model, so the sender aborted version {version}; weights here are unchanged")
        out = {k: torch.empty(t.shape, dtype=t.dtype, device=t.device) for k, t in like.items()}
        flat = {k: t.view(-1) for k, t in out.items()}
        plan = _buckets(like, bucket_bytes)
        for i, (dtype, segs) in enumerate(plan):
            buf = torch.empty(sum(b - a for _, a, b in segs), dtype=dtype, device=group.device)
            _wait(group, group.backend.broadcast(buf.view(torch.uint8), 0), f"bucket {i + 1}/{len(plan)}")
            off = 0
            for k, a, b in segs:
                flat[k][a:b].copy_(buf[off:off + b - a])
                off += b - a
        self.last_bytes, self.last_buckets = total, len(plan)
        return version, out
