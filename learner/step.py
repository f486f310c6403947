"""The learner's loss on one RoutedBatch — shared by the plain and the DeepSpeed learner.

Algorithm-blind: it sees (state, sigma, cond, target, weight, route) and a method name, never
a teacher, a router or a dataset.
"""

from __future__ import annotations

import pyarrow as pa

from danceopd.batch import scalars, to_tensors
from danceopd.losses import compute_loss, per_route_mean


def batch_loss(backend, model, method_cfg, rb: pa.RecordBatch, device="cpu"):
    t = {k: v.to(device) for k, v in to_tensors(rb).items()}
    pred = backend.predict(model, t["state"], t["sigma"], t["cond"]).float()
    loss, per_row = compute_loss(method_cfg, pred, t)
    backend.simulated_compute("learner")
    return loss, per_route_mean(per_row.cpu(), scalars(rb, "route"))


def merge_route_losses(parts: list[dict[str, float]]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for p in parts:
        for k, v in p.items():
            acc.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}
