"""Sizes of weight states (what a push moves)."""

from __future__ import annotations


def state_nbytes(state: dict) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))
