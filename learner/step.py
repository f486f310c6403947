"""The learner's loss on one RoutedBatch — shared by the plain and the DeepSpeed learner.

Algorithm-blind: the method object (danceopd/methods/) says how to predict and what the loss
is; the learner never sees a teacher, a router or a dataset, nor checks a method's name.
"""

from __future__ import annotations

from contextlib import nullcontext

import pyarrow as pa
import torch

from danceopd.batch import nonfinite, scalars, to_tensors
from danceopd.losses import per_route_mean


def forward_precision(precision: str, model):
    """The context the learner's forward runs in: bf16 autocast for `learner.precision: bf16`,
    on the autocast of the device the model's weights are on (CPU or CUDA); nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    return nullcontext()


def batch_loss(backend, model, method, rb: pa.RecordBatch, device="cpu", precision: str = "fp32"):
    """(loss, per-route losses, what held NaN/Inf: "prediction", "loss" or None). The prediction
    runs under `precision` (forward_precision); the loss is taken in fp32 outside autocast. A
    non-finite micro-batch is still back-propagated (ZeRO's reductions run inside backward, on
    every rank alike); the learner then skips the whole step."""
    t = {k: v.to(device) for k, v in to_tensors(rb).items()}
    with forward_precision(precision, model):
        pred = method.predict(backend, model, t)
    loss, per_row = method.loss(pred.float(), t)
    backend.simulated_compute("learner")
    return loss, per_route_mean(per_row.cpu(), scalars(rb, "route")), nonfinite(prediction=pred.detach(), loss=loss.detach())


def merge_route_losses(parts: list[dict[str, float]]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for p in parts:
        for k, v in p.items():
            acc.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}
