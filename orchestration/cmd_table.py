"""`ultramem table create|inspect` (DESIGN §5, §7.1): make a memory table, or describe one.

Both are thin: the table layout lives in storage/; this module turns flags into a TableSpec,
storage errors into one-line usage errors (exit 2), and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.errors import UsageError
from storage.errors import StorageError
from storage.layout import VALUES, TableSpec
from storage.table_store import TableStore, create_table, open_table

logger = logging.getLogger(__name__)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def create(args: argparse.Namespace) -> int:
    """Create a table at args.path, initialised partition by partition; prints one summary line."""
    path = Path(args.path)
    try:
        spec = TableSpec(name=args.name or path.name.removesuffix(".zarr"), rows=args.rows, dim=args.dim,
                         dtype=args.dtype, num_partitions=args.partitions, optimizer=args.optimizer,
                         init_std=args.init_std, seed=args.seed)
        store = create_table(path, spec, compress_state=not args.raw)
    except StorageError as err:
        raise UsageError(str(err)) from None
    total = sum(store.nbytes().values())
    print(f"created table {spec.name} at {path}: {spec.rows} rows x {spec.dim} {spec.dtype}, "
          f"{spec.num_partitions} partitions, optimizer {spec.optimizer}, {_human(total)}")
    return 0


def describe(store: TableStore) -> dict[str, Any]:
    """Spec, partition sizes, bytes per array and optimizer-state summary of a table (reads it all,
    one partition at a time)."""
    spec = store.spec
    state_names = [n for n in store.array_names if n != VALUES]
    touched = 0
    stats: dict[str, dict[str, float]] = {n: {"nonzero_rows": 0, "max_abs": 0.0} for n in state_names}
    value_sq, value_n = 0.0, 0
    for p in range(spec.num_partitions):
        arrays = store.read_partition(p)
        n = spec.valid_rows(p)
        values = arrays[VALUES][:n].astype(np.float32)
        value_sq += float(np.square(values, dtype=np.float64).sum())
        value_n += values.size
        hit = np.zeros(n, dtype=bool)
        for name in state_names:
            a = arrays[name][:n].reshape(n, -1)
            nz = np.any(a != 0, axis=1)
            hit |= nz
            stats[name]["nonzero_rows"] += int(nz.sum())
            stats[name]["max_abs"] = max(stats[name]["max_abs"], float(np.abs(a).max()) if a.size else 0.0)
        touched += int(hit.sum())
    return {
        "path": str(store.path),
        "spec": spec.to_dict(),
        "rows_per_partition": spec.rows_per_partition,
        "partition_rows": {"min": min(spec.valid_rows(p) for p in range(spec.num_partitions)),
                           "max": spec.rows_per_partition},
        "bytes": store.nbytes(),
        "chunks": {n: list(store.chunk_shape(n)) for n in store.array_names},
        "values_rms": (value_sq / value_n) ** 0.5 if value_n else 0.0,
        "optimizer_state": {"rows_touched": touched, "arrays": stats},
    }


def inspect(args: argparse.Namespace) -> int:
    """Print what `describe` finds, as text or (--json) JSON."""
    try:
        info = describe(open_table(args.path, "r"))
    except StorageError as err:
        raise UsageError(str(err)) from None
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    spec = info["spec"]
    print(f"table {spec['name']} at {info['path']}")
    for key in ("rows", "dim", "dtype", "num_partitions", "optimizer", "optimizer_args", "init_std", "seed",
                "version"):
        print(f"  {key:16s} {spec.get(key)}")
    print(f"  {'partitions':16s} {spec['num_partitions']} x {info['rows_per_partition']} rows "
          f"(smallest {info['partition_rows']['min']})")
    for name, n in info["bytes"].items():
        print(f"  bytes {name:10s} {_human(n):>12s}  chunks {info['chunks'][name]}")
    print(f"  {'values rms':16s} {info['values_rms']:.6g}")
    state = info["optimizer_state"]
    print(f"  optimizer state: {state['rows_touched']} of {spec['rows']} rows touched")
    for name, s in state["arrays"].items():
        print(f"    {name:12s} nonzero rows {s['nonzero_rows']}, max |x| {s['max_abs']:.6g}")
    return 0
