"""Signals that ask a running job to stop gracefully."""

from __future__ import annotations

import signal
import sys
import threading


class StopOnSignal:
    """SIGTERM / SIGINT (`ray job stop`, pod eviction, Ctrl-C) ask the loop to stop gracefully:
    finish the running step, write the final checkpoint, exit 0 within `checkpoint.stop_grace_s`
    of it (TrainLoop.finish). A second signal aborts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.loop, self.received = None, None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.loop is None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} before the job started")
        if self.received is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: aborting without a final checkpoint")
        self.received = signal.Signals(signum).name
        print(f"{self.received}: stopping after step {self.loop.step + 1 if self.loop.learner.busy else self.loop.step}"
              f", then the final checkpoint (send it again to abort)", file=sys.stderr, flush=True)
        self.loop.request_stop(self.received)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
