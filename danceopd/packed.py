"""Weights as numpy arrays for the object store.

Ray stores a numpy array out of band and a reader maps it from shared memory without a copy; a
torch tensor is pickled through torch's storage serializer and re-read with a copy (measured on
the 2-core machine: 8 small tensors, 1.5-1.9 ms per `ray.get` as torch tensors, 0.2-0.3 ms as
numpy). The weights a push publishes are read by every rollout worker, so they travel packed."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch


class Raw(NamedTuple):
    """A tensor of a dtype numpy lacks (bfloat16, float8): its bytes, dtype name and shape."""

    data: np.ndarray  # uint8
    dtype: str
    shape: tuple


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray | Raw]:
    out = {}
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        try:
            out[k] = t.numpy()
        except TypeError:  # no numpy dtype for it
            out[k] = Raw(t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return out


def unpack_state(state: dict) -> dict[str, torch.Tensor]:
    """Tensors over the arrays' memory (no copy): read them, copy them into the model, do not
    write them (an array read from the object store is read-only shared memory). Tensors pass
    through, so an unpacked or never-packed state is accepted too."""
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, v in state.items():
            if isinstance(v, Raw):
                out[k] = torch.from_numpy(v.data).view(getattr(torch, v.dtype)).reshape(v.shape)
            elif isinstance(v, np.ndarray):
                out[k] = torch.from_numpy(v)
            else:
                out[k] = v
    return out
