"""Backend registry. Imports are lazy so the toy backend never pulls in diffusers."""

from __future__ import annotations

from danceopd.backends.base import Backend, Row, TeacherField

__all__ = ["Backend", "Row", "TeacherField", "make_backend"]


def make_backend(cfg) -> Backend:
    name = cfg.backend.name
    if name == "toy":
        from danceopd.backends.toy import ToyBackend

        return ToyBackend(cfg)
    if name == "shapes":
        from danceopd.backends.shapes import ShapesBackend

        return ShapesBackend(cfg)
    if name == "sim":
        from danceopd.backends.sim import SimBackend

        return SimBackend(cfg)
    if name == "sd3":
        from danceopd.backends.sd3 import SD3Backend

        return SD3Backend(cfg)
    if name == "zimage":
        from danceopd.backends.zimage import ZImageBackend

        return ZImageBackend(cfg)
    raise ValueError(f"backend.name: unknown backend {name!r} (known: toy, shapes, sim, sd3, zimage)")
