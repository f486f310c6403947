"""Where a role's tensors live, and what its GPU held at most.

A rollout keeps its states on the student's device for every Euler step, and the learner moves
a micro-batch there once; both ask the model where that is. `peak_gpu_memory_bytes` is what each
role reports in its statistics (summary.json's `peak_gpu_memory_bytes`).
"""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def peak_gpu_memory_bytes() -> int:
    """torch's peak of allocated GPU memory in this process; 0 where CUDA was never used (asking
    would start it)."""
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_initialized() else 0
