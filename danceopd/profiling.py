"""torch.profiler traces of a few calls (`logging.profile_steps`, `danceopd train --profile N`).

A `CallProfiler` wraps a component's unit of work (a learner step, a rollout batch): the first
call is a warm-up (allocator, lazy initialisation, first-call compilation), the next `steps` calls
are each recorded into a Chrome trace. The traces are held as bytes until `take()`: the component
hands them back with the answer the driver fetches anyway (the step's metrics, the batch's meta),
and the driver writes them under job.output_dir/profile/ (`write_traces`). So a trace made on
another node needs no shared file system, no extra remote call, and is written as soon as it is
made. Open one in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

PROFILE_DIR = "profile"  # under job.output_dir


class CallProfiler:
    def __init__(self, steps: int, warmup: int = 1):
        self.steps, self.warmup = steps, warmup
        self.calls = 0
        self.traces: dict[str, bytes] = {}  # file name -> Chrome trace JSON

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Run the body; record it as `name`.json if it is one of the profiled calls."""
        i, self.calls = self.calls, self.calls + 1
        if not self.warmup <= i < self.warmup + self.steps:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            yield
        with tempfile.TemporaryDirectory() as tmp:  # the exporter writes a file; the bytes travel
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            self.traces[f"{name}.json"] = path.read_bytes()

    def step(self, name: str, fn, *args) -> dict:
        """`fn(*args)`, a dict of results, recorded as `name` when profiled; its trace rides in
        the result as `traces` (a learner step's metrics go back to the driver anyway)."""
        with self(name):
            result = fn(*args)
        if traces := self.take():
            result["traces"] = traces
        return result

    def take(self) -> dict[str, bytes]:
        """The traces recorded since the last take (usually none)."""
        out, self.traces = self.traces, {}
        return out


def write_traces(out_dir: Path, traces: dict[str, bytes]) -> list[Path]:
    """Write `traces` into out_dir/profile/; their paths."""
    if not traces:
        return []
    folder = Path(out_dir) / PROFILE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in traces.items():
        path = folder / Path(name).name  # a bare file name, whoever made it
        # A restarted component (rollout-0 after a kill, a resumed job) profiles its first calls
        # again under the same names: keep the earlier trace, number the new one.
        n = 1
        while path.exists():
            n += 1
            path = folder / f"{Path(name).stem}.{n}{Path(name).suffix}"
        path.write_bytes(data)
        written.append(path)
    return written
