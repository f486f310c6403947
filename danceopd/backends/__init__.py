"""Backend registry: `backend.name` -> the family's config section (danceopd.config.BACKENDS) and
its backend class, imported on first use so the toy backend never pulls in diffusers.

What a family supports is declared on its class (`Backend.teacher_kinds`, `pipeline`,
`condition_cache`, `sigma_grid`, `write_tiny`, ...); code outside this registry asks the class,
it never compares backend names.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING

from danceopd.backends.base import Backend, Row, TeacherField
from danceopd.config import BACKENDS

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

__all__ = ["Backend", "Row", "TeacherField", "backend_class", "backends_where", "make_backend"]


def backend_class(name: str) -> type[Backend]:
    """The backend class of family `name` (its module imported now)."""
    if name not in BACKENDS:
        raise ValueError(f"backend.name: unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    module, cls = BACKENDS[name].impl.split(":")
    return getattr(import_module(module), cls)


def backends_where(capability: Callable[[type[Backend]], bool]) -> list[str]:
    """Names of the families whose class has `capability` (for messages that say which to use)."""
    return [name for name in BACKENDS if capability(backend_class(name))]


def make_backend(cfg: Config) -> Backend:
    return backend_class(cfg.backend.name)(cfg)
