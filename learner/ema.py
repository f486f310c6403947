"""An exponential moving average of the student's trainable weights (`learner.ema_decay`).

Kept in fp32 whatever the weights' dtype (bf16 working weights under DeepSpeed's bf16 mode
included: averaging in bf16 would stall once decay*ema and ema round to the same number).
"""

from __future__ import annotations

import torch


class Ema:
    """ema <- decay * ema + (1 - decay) * weights after each applied optimizer step; it starts
    at the weights it is built from (the initial student, or a resumed checkpoint's average)."""

    def __init__(self, decay: float, weights: dict[str, torch.Tensor]):
        self.decay = decay
        self.state = {k: v.detach().to(torch.float32, copy=True) for k, v in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        for k, avg in self.state.items():
            avg.lerp_(weights[k].detach().to(avg.device, torch.float32), 1.0 - self.decay)

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v.to("cpu", copy=True) for k, v in self.state.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the average (a checkpoint's ema.safetensors, or weights it restarts from)."""
        mine = {k: tuple(v.shape) for k, v in self.state.items()}
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        if mine != theirs:
            diff = sorted(set(mine) ^ set(theirs)) or sorted(k for k in mine if mine[k] != theirs[k])
            raise ValueError(f"EMA state: does not match the student's trainable weights (first difference: {diff[0]!r})")
        with torch.no_grad():
            for k, avg in self.state.items():
                avg.copy_(state[k].to(avg.device, torch.float32))
