"""One object per distillation method: what its rollout is, which states it queries, how its
targets are built, its loss and any reward computed upstream of the learner.

Worker, router, learner and config ask the method; none of them checks a method's name.
"""

from __future__ import annotations

from danceopd.methods.base import Method
from danceopd.methods.flowopd import FlowOPD
from danceopd.methods.regression import SFT, DanceOPD, DiffusionOPD, OffPolicy, SoftMix

METHODS: dict[str, type[Method]] = {m.name: m for m in (DanceOPD, DiffusionOPD, FlowOPD, OffPolicy, SFT, SoftMix)}


def make_method(method_cfg) -> Method:
    if method_cfg.name not in METHODS:
        raise ValueError(f"method.name: unknown method {method_cfg.name!r} (known: {', '.join(METHODS)})")
    return METHODS[method_cfg.name](method_cfg)


__all__ = ["METHODS", "Method", "make_method"]
