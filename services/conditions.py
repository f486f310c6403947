"""The job's condition cache, built once on the driver before any actor starts (actors only read it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


def build_condition_cache(cfg: Config, progress: bool = True, force: bool = False):
    """(path, built) of the job's condition cache, built when missing or stale; (None, False) for
    backends without one. A rich progress bar while encoding."""
    from danceopd.backends import backend_class

    if not backend_class(cfg.backend.name).condition_cache:
        return None, False
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from danceopd.backends import make_backend

    backend = make_backend(cfg)
    with Progress(TextColumn("encoding conditions"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("cache", total=None)
        return backend.build_cache(progress=lambda done, total: bar.update(task, completed=done, total=total), force=force)
