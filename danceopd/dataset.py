"""Datasets: a CSV or Parquet file, one row per sample, bucketed by task.

Columns: uid, task, prompt, source_image, target_image (+ optional raw_task, caption_dict).
Image paths are relative to the data file. Buckets are built once at load time, so sampling
is an O(1) index draw from a seeded generator, never a scan.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from danceopd.backends.base import Row

REQUIRED = ("uid", "task", "prompt", "source_image", "target_image")
OPTIONAL = ("raw_task", "caption_dict")


class DatasetError(ValueError):
    pass


def _read_table(path: Path):
    if path.suffix not in (".csv", ".parquet"):
        raise DatasetError(f"data.path: {path.name}: expected a .csv or .parquet file")
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        # Everything is a string: uids like "007" and empty image cells must stay as written.
        opts = pacsv.ConvertOptions(strings_can_be_null=False, column_types={c: "string" for c in REQUIRED + OPTIONAL})
        return pacsv.read_csv(path, convert_options=opts)
    except (pa.ArrowException, OSError, UnicodeError) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DatasetError(f"data.path: {path.name}: not a readable {path.suffix[1:]} file ({detail})") from None


class Dataset:
    def __init__(self, rows: list[Row], path: Path):
        self.path = path
        self.rows = rows
        self.by_uid = {r.uid: r for r in rows}
        self.line = {r.uid: i + 1 for i, r in enumerate(rows)}  # data row number (header not counted)
        self.buckets: dict[str, list[Row]] = {}
        for r in rows:
            self.buckets.setdefault(r.task, []).append(r)

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"data.path: {path}: file not found")
        table = _read_table(path)
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise DatasetError(f"data.path: {path.name}: missing column {missing[0]!r}")
        cols = {c: table.column(c).to_pylist() for c in REQUIRED + OPTIONAL if c in table.column_names}
        base = path.parent
        rows, seen = [], set()
        for i in range(table.num_rows):
            uid = str(cols["uid"][i] or "").strip()
            if not uid:
                raise DatasetError(f"data.path: {path.name} row {i + 1}: empty uid")
            if uid in seen:
                raise DatasetError(f"data.path: {path.name} row {i + 1}: duplicate uid {uid!r}")
            seen.add(uid)
            task = str(cols["task"][i] or "").strip()
            if not task:
                raise DatasetError(f"data.path: {path.name} row {i + 1} (uid {uid}): empty task")

            def img(name, i=i):
                v = cols[name][i]
                return (base / v) if v else None

            rows.append(Row(
                uid=uid, task=task, prompt=str(cols["prompt"][i] or ""),
                source_image=img("source_image"), target_image=img("target_image"),
                raw_task=(cols.get("raw_task") or [None] * table.num_rows)[i] or None,
                caption_dict=(cols.get("caption_dict") or [None] * table.num_rows)[i] or None,
            ))
        return cls(rows, path)

    def sample(self, task: str, rng: np.random.Generator) -> Row:
        bucket = self.buckets.get(task)
        if not bucket:
            raise DatasetError(f"task {task!r} has no samples in {self.path.name}")
        return bucket[int(rng.integers(len(bucket)))]

    def where(self, row: Row) -> str:
        """`data.path: FILE row N (uid U)`: the start of a one-line message about a row."""
        return f"data.path: {self.path.name} row {self.line.get(row.uid, '?')} (uid {row.uid})"

    def check_routes(self, routes) -> None:
        """Every route's bucket is non-empty, edit routes have source images, files exist."""
        for i, route in enumerate(routes):
            bucket = self.buckets.get(route.task, [])
            if not bucket:
                known = ", ".join(sorted(self.buckets)) or "none"
                raise DatasetError(f"routing.routes.{i}.task: bucket {route.task!r} is empty in {self.path.name} (tasks present: {known})")
            for r in bucket:
                if route.requires_source_image and r.source_image is None:
                    raise DatasetError(f"{self.where(r)}: route {route.name!r} requires a source image, the row has none")
        for r in self.rows:
            for name in ("source_image", "target_image"):
                p = getattr(r, name)
                if p is not None and not p.is_file():
                    raise DatasetError(f"{self.where(r)}: {name} {p} does not exist")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(REQUIRED + OPTIONAL))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in REQUIRED + OPTIONAL})
    return path


def write_toy_dataset(out_dir: str | Path, tasks: list[str], num_classes: int, n_per_task: int) -> Path:
    """Prompts `class <i>` cycling through the classes, for the toy backend."""
    rows = [
        {"uid": f"{task}-{j:05d}", "task": task, "prompt": f"class {j % num_classes}"}
        for task in tasks for j in range(n_per_task)
    ]
    return write_rows(Path(out_dir) / "data.csv", rows)
