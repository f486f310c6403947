"""The condition cache: text embeddings and image latents computed once per dataset row.

Real text encoders (CLIP + T5, Qwen) and VAEs turn a row into megabytes of fp32 (SD3.5-Medium:
5.5 MB of prompt embeddings per row). Encoding them again in every rollout worker and teacher,
and shipping them inside every routed batch, would dominate both compute and the object store.
So a latent backend encodes each row once, into one Arrow IPC file per (dataset, encoder
fingerprint), and batches carry a *handle* instead: `[index_hi, index_lo, text_on]` (3 floats),
where `index` is the row's position in the cache and `text_on = 0` is CFG's null branch (the
row's source latents, the empty prompt's embeddings). Every process memory-maps the same file.

The file name holds the fingerprint, and the fingerprint is checked again against the file's
own metadata when it is opened: a cache made by other encoders, for another resolution or for
other row contents is never used; `ensure` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

NULL_UID = "__null__"  # the empty prompt (CFG's unconditional text), always row 0
HANDLE_DIM = 3
_INDEX_BASE = 1 << 20  # index = hi * 2^20 + lo: both exact in fp32, up to 2^40 rows
SCHEMA_VERSION = 1


class StaleCacheError(ValueError):
    """The cache file was made by other encoders or for other rows."""


def handles(indices: Iterable[int], text_on: bool = True) -> torch.Tensor:
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    out = torch.empty(len(idx), HANDLE_DIM)
    out[:, 0] = (idx // _INDEX_BASE).float()
    out[:, 1] = (idx % _INDEX_BASE).float()
    out[:, 2] = 1.0 if text_on else 0.0
    return out


def handle_indices(cond: torch.Tensor) -> torch.Tensor:
    c = cond.detach().float().cpu()
    return (c[:, 0].round().long() * _INDEX_BASE + c[:, 1].round().long())


def handle_text_on(cond: torch.Tensor) -> torch.Tensor:
    return cond.detach().float().cpu()[:, 2] > 0.5


def null_handles(cond: torch.Tensor) -> torch.Tensor:
    """CFG's unconditional branch: same row (its source latents stay), no text."""
    out = cond.clone()
    out[:, 2] = 0.0
    return out


def fingerprint(parts: dict) -> str:
    """A stable digest of whatever decides the cached values (encoder configs and weight files,
    resolution, sequence length, every row's prompt and image bytes' identity)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


_SAMPLE = 64 * 1024


def file_identity(path: Path, root: Path) -> list:
    """A file's path relative to `root`, size and a digest of its first and last 64 KiB: enough to
    notice a replaced weight file or image without reading gigabytes, and the same on every node
    of a cluster (absolute paths and mtimes differ where Ray unpacks a job's working directory)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            f.seek(-_SAMPLE, os.SEEK_END)
            h.update(f.read(_SAMPLE))
    rel = os.path.relpath(path.resolve(), Path(root).resolve())
    return [rel, size, h.hexdigest()[:16]]


def folder_identity(folder: Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.model")) -> list:
    folder = Path(folder)
    files = sorted({p for pat in patterns for p in folder.rglob(pat) if p.is_file()})
    return [file_identity(p, folder) for p in files]


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint a cache file was made with, from its schema metadata only (the Arrow
    footer: no row is read), or None when there is no whole cache file there."""
    try:
        with pa.memory_map(str(path), "r") as source:
            meta = pa.ipc.open_file(source).schema.metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return meta.get(b"danceopd.fingerprint", b"").decode() or None


class ConditionCache:
    """A read-only, memory-mapped cache file: uid -> index, index -> named fp32 tensors."""

    def __init__(self, path: Path, expected_fingerprint: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"condition cache {self.path} does not exist (build it with `danceopd cache CONFIG`)")
        self._source = pa.memory_map(str(self.path), "r")
        reader = pa.ipc.open_file(self._source)
        meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
        self.fingerprint = meta.get("danceopd.fingerprint", "")
        if expected_fingerprint is not None and self.fingerprint != expected_fingerprint:
            raise StaleCacheError(f"condition cache {self.path}: made by other encoders or rows "
                                  f"(fingerprint {self.fingerprint[:12]} != {expected_fingerprint[:12]})")
        self.table = reader.read_all()
        self.fields = [n for n in self.table.column_names if n != "uid"]
        self.uids = self.table.column("uid").to_pylist()
        self.index = {u: i for i, u in enumerate(self.uids)}
        self._columns = {n: self.table.column(n).combine_chunks() for n in self.fields}

    def __len__(self) -> int:
        return len(self.uids)

    def indices(self, uids: list[str]) -> list[int]:
        missing = [u for u in uids if u not in self.index]
        if missing:
            raise KeyError(f"condition cache {self.path.name}: row {missing[0]!r} is not in it (rebuild with `danceopd cache CONFIG`)")
        return [self.index[u] for u in uids]

    def get(self, indices, field: str) -> torch.Tensor:
        """Rows `indices` of one field, [B, *shape] fp32 (a copy: the map stays read-only)."""
        idx = pa.array(np.asarray(indices, dtype=np.int64))
        arr = self._columns[field].take(idx)
        return torch.from_numpy(arr.to_numpy_ndarray().copy())

    def row_bytes(self) -> int:
        """Bytes one row of the cache holds (what a batch would carry without handles)."""
        return sum(int(np.prod(self._columns[f].type.shape)) * 4 for f in self.fields)


def build(path: Path, fp: str, uids: list[str], encode: Callable[[list[int]], dict[str, torch.Tensor]],
          batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> Path:
    """Encode rows (`encode(positions) -> {field: [B, *shape]}`, positions into `uids`) into an
    Arrow IPC file written under a temporary name and renamed when complete, so a crash never
    leaves a half cache that looks whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    writer = sink = schema = None
    done = 0
    try:
        for start in range(0, len(uids), batch_size):
            pos = list(range(start, min(start + batch_size, len(uids))))
            out = encode(pos)
            cols = {"uid": pa.array([uids[i] for i in pos], pa.string())}
            for name, t in out.items():
                a = np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.float32)
                cols[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(a)
            rb = pa.RecordBatch.from_pydict(cols)
            if writer is None:
                schema = rb.schema.with_metadata({"danceopd.fingerprint": fp, "danceopd.schema": str(SCHEMA_VERSION)})
                sink = pa.OSFile(str(tmp), "wb")
                writer = pa.ipc.new_file(sink, schema)
            writer.write_batch(pa.RecordBatch.from_arrays(rb.columns, schema=schema))
            done += len(pos)
            if progress:
                progress(done, len(uids))
        writer.close()
        sink.close()
        writer = sink = None
        tmp.replace(path)
    finally:
        for f in (writer, sink):
            if f is not None:
                f.close()
        if tmp.exists():
            tmp.unlink()
    return path
