"""RolloutBatch / RoutedBatch: one Arrow schema on the wire, in spill files and in tests.

One row per queried state. Tensor columns are Arrow fixed-shape tensors in fp32 (Arrow has
no bf16). A RolloutBatch is a RoutedBatch whose `target` is not filled yet (zeros) and whose
`teacher_id` is empty; the router fills both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

TENSOR_COLUMNS = ("state", "next_state", "cond", "target", "rollout_velocity")
SCALAR_COLUMNS = {
    "sample_id": pa.string(),
    "sample_index": pa.int64(),
    "route": pa.string(),
    "task": pa.string(),
    "seed": pa.int64(),
    "policy_version": pa.int64(),
    "ticket": pa.int64(),
    "query_index": pa.int32(),
    "sigma": pa.float32(),
    "sigma_next": pa.float32(),
    "weight": pa.float32(),
    "advantage": pa.float32(),  # flowopd: filled by the router once the teacher answered
    "group": pa.int64(),
    "worker_id": pa.string(),
    "teacher_id": pa.string(),
}


SDE_COLUMNS = ("next_state", "rollout_velocity")  # only SDE rollouts (flowopd) fill them


def batch_schema(state_shape: tuple[int, ...], cond_dim: int, sde: bool = True) -> pa.Schema:
    """`sde=False` leaves out next_state and rollout_velocity: for ODE and data methods they would
    be zeros, two state-sized tensors per row (2 MiB at SD3's 1024 px latents) for nothing."""
    st = pa.fixed_shape_tensor(pa.float32(), list(state_shape))
    fields = [pa.field(n, t, nullable=False) for n, t in SCALAR_COLUMNS.items()]
    fields += [pa.field(n, st, nullable=False) for n in TENSOR_COLUMNS if n != "cond" and (sde or n not in SDE_COLUMNS)]
    fields.append(pa.field("cond", pa.fixed_shape_tensor(pa.float32(), [cond_dim]), nullable=False))
    return pa.schema(fields)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def make_batch(schema: pa.Schema, columns: dict) -> pa.RecordBatch:
    """Columns by name; tensor columns as [R, *shape] arrays or tensors. Missing optional
    tensor columns (target, next_state, rollout_velocity) are zero-filled."""
    n = len(columns["sample_id"])
    arrays = []
    for f in schema:
        if f.name in TENSOR_COLUMNS:
            shape = tuple(f.type.shape)
            value = columns.get(f.name)
            arr = np.zeros((n, *shape), np.float32) if value is None else _np(value)
            if arr.shape != (n, *shape):
                raise ValueError(f"column {f.name}: shape {arr.shape} != {(n, *shape)}")
            arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(arr))
        else:
            value = columns.get(f.name)
            if value is None:
                value = [""] * n if f.type == pa.string() else [0] * n
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arrays.append(pa.array(value, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def tensor(rb: pa.RecordBatch, name: str) -> torch.Tensor:
    return torch.from_numpy(rb.column(name).to_numpy_ndarray().copy())


def scalars(rb: pa.RecordBatch, name: str) -> list:
    return rb.column(name).to_pylist()


def to_tensors(rb: pa.RecordBatch) -> dict[str, torch.Tensor]:
    """The learner's view: tensors only (strings stay in the record batch)."""
    out = {n: tensor(rb, n) for n in TENSOR_COLUMNS if n in rb.schema.names}
    for n in ("sigma", "sigma_next", "weight", "advantage"):
        out[n] = torch.from_numpy(rb.column(n).to_numpy().astype(np.float32))
    for n in ("sample_index", "group", "query_index"):
        out[n] = torch.from_numpy(rb.column(n).to_numpy().astype(np.int64))
    return out


def replace_columns(rb: pa.RecordBatch, **columns) -> pa.RecordBatch:
    """A copy of `rb` with some columns replaced (tensors or per-row values)."""
    data = {}
    for f in rb.schema:
        if f.name in columns:
            data[f.name] = columns[f.name]
        elif f.name in TENSOR_COLUMNS:
            data[f.name] = rb.column(f.name).to_numpy_ndarray()
        else:
            data[f.name] = rb.column(f.name)
    return make_batch(rb.schema, data)


def nonfinite(**values) -> str | None:
    """The name of the first value holding NaN or Inf (tensors, arrays, numbers), else None: the
    one finite check of teacher answers, routed targets, predictions, losses, gradient norms and
    the weights a checkpoint writes."""
    for name, v in values.items():
        if not (torch.isfinite(v).all() if isinstance(v, torch.Tensor) else np.isfinite(np.asarray(v)).all()):
            return name
    return None


def num_samples(rb: pa.RecordBatch) -> int:
    return len(set(rb.column("sample_index").to_pylist()))


def write_ipc(path: Path, batches: list[pa.RecordBatch]) -> None:
    """Arrow IPC file, written to a temporary name first so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batches[0].schema) as writer:
        for b in batches:
            writer.write_batch(b)
    tmp.replace(path)


def read_ipc(path: Path) -> list[pa.RecordBatch]:
    with pa.memory_map(str(path), "r") as source:
        reader = pa.ipc.open_file(source)
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
