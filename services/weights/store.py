"""WeightStore: the latest student weights with a monotonic version.

Pull-based: a new or restarted rollout worker asks for `latest()`; live workers are told a
new version exists by the controller. The store holds whatever the transport hands it (an
object-store reference in Ray mode, a state dict in one process) and never goes back in time.
"""

from __future__ import annotations


class WeightStore:
    def __init__(self):
        self.version = -1
        self.payload = None
        self.nbytes = 0

    def put(self, version: int, payload, nbytes: int = 0) -> int:
        if version <= self.version:
            raise ValueError(f"weight store: version {version} is not newer than {self.version}")
        self.version, self.payload, self.nbytes = int(version), payload, int(nbytes)
        return self.version

    def latest(self):
        """(version, payload), or None before the first push."""
        return None if self.version < 0 else (self.version, self.payload)

    def get_version(self) -> int:
        return self.version


def state_nbytes(state: dict) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))
