"""A training run's checkpoint, written and read by one process (DESIGN §5 "Checkpoint").

`<root>/step-<N>/` holds:

    tables/<name>/    each memory table as a Zarr v3 group: values + sparse optimizer state
                      (storage/table_store.py), written partition by partition
    dense.pt          torch: {"model": state dict (π and the TDQKR filter are buffers in it),
                      "optimizer": AdamW state, "train": step, RNG state, data position}
    config.json       the resolved run config (a run is rebuilt from it)
    tokenizer.json    the tokenizer, so generation needs nothing but this directory
    manifest.json     written last (storage.checkpoint.write_manifest): without it the directory is
                      an unfinished checkpoint and is never loaded

The distributed trainer writes the same layout, with each shard writing its own partitions.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_workers.values import LocalBackend
from storage.checkpoint import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    step_dir,
    table_path,
    write_manifest,
)
from storage.errors import CheckpointError
from storage.table_store import create_table, open_table

logger = logging.getLogger(__name__)

DENSE = "dense.pt"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
KIND = "ultramem.local"  # manifest "kind" of a checkpoint written by this module


def begin_checkpoint(path: Path) -> None:
    """Make an empty step directory; an unfinished one (no manifest) left by a crash is replaced.

    Raises CheckpointError if a complete checkpoint already exists there.
    """
    if (path / MANIFEST).exists():
        raise CheckpointError(f"{path} is already a complete checkpoint")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def finish_checkpoint(path: Path, *, dense: dict[str, Any], train_state: dict[str, Any],
                      config: dict[str, Any], tokenizer_json: str | None, tables: list[str],
                      kind: str = KIND) -> None:
    """Write dense.pt, config.json, tokenizer.json, then the manifest (last): the checkpoint now exists.

    `dense` is {"model": state dict, "optimizer": AdamW state or None}; the table groups named in
    `tables` must already be written under path/tables/.
    """
    buf = io.BytesIO()
    torch.save({**dense, "train": train_state}, buf)
    atomic_write_bytes(path / DENSE, buf.getvalue())
    atomic_write_json(path / CONFIG, config)
    if tokenizer_json is not None:
        atomic_write_bytes(path / TOKENIZER, tokenizer_json.encode("utf-8"))
    write_manifest(path, {"kind": kind, "tables": list(tables)})
    logger.info("wrote checkpoint %s", path)


def save_checkpoint(root: str | Path, step: int, *, model: nn.Module, backend: LocalBackend | None,
                    optimizer: torch.optim.Optimizer | None, train_state: dict[str, Any],
                    config: dict[str, Any], tokenizer_json: str | None = None) -> Path:
    """Write `<root>/step-<step>/` (manifest last) and return it.

    An existing complete checkpoint of that step is kept as is; an unfinished one is replaced.
    """
    path = step_dir(root, step)
    if (path / MANIFEST).exists():
        try:
            read_manifest(path)
            return path
        except CheckpointError:
            pass
    if path.exists():  # a complete checkpoint whose manifest does not verify: rewrite it
        shutil.rmtree(path)
    begin_checkpoint(path)

    names = []
    tables = backend.tables() if backend is not None else {}
    for name, spec in tables.items():  # values + optimizer state, DESIGN §5
        store = create_table(table_path(path, name), spec, initialize=False)
        for p, arrays in backend.export_partitions(name).items():  # type: ignore[union-attr]
            store.write_partition(p, arrays)
        names.append(name)
    dense = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None}
    finish_checkpoint(path, dense=dense, train_state=train_state, config=config, tokenizer_json=tokenizer_json,
                      tables=names)
    return path


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint from a step dir, a checkpoints root, or a run dir (newest wins).

    Raises CheckpointError when there is none (an unfinished step dir does not count).
    """
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("step-"):
        read_manifest(path)  # raises for an unfinished checkpoint
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint in {path}")


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    return latest_checkpoint(root)


def read_config(path: str | Path) -> dict[str, Any]:
    """The run config saved in a complete checkpoint."""
    import json

    ckpt = find_checkpoint(path)
    return json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))


def read_dense(path: str | Path) -> dict[str, Any]:
    """The dense.pt of a complete checkpoint: {"model", "optimizer", "train"} (on the CPU)."""
    ckpt = find_checkpoint(path)
    return torch.load(io.BytesIO((ckpt / DENSE).read_bytes()), map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path, model: nn.Module, *, backend: LocalBackend | None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load dense state (and AdamW state when `optimizer` is given) and every table into `backend`.

    Returns the saved train state ({"step", "rng", "data"}). Raises CheckpointError for an
    unfinished checkpoint, and before touching anything when the tables do not match the model's.
    """
    ckpt = find_checkpoint(path)
    manifest = read_manifest(ckpt)
    specs = backend.tables() if backend is not None else {}
    have = set(manifest.get("tables", []))
    if set(specs) != have:
        raise CheckpointError(f"{ckpt}: tables {sorted(have)} do not match the model's {sorted(specs)}")
    stores = {name: open_table(table_path(ckpt, name)) for name in sorted(have)}
    for name, store in stores.items():
        if (store.spec.rows, store.spec.dim) != (specs[name].rows, specs[name].dim):
            raise CheckpointError(f"{ckpt}: table {name} is {store.spec.rows}x{store.spec.dim}, the model "
                                  f"wants {specs[name].rows}x{specs[name].dim}")
    dense = read_dense(ckpt)

    model.load_state_dict(dense["model"])
    if optimizer is not None:
        if dense["optimizer"] is None:
            raise CheckpointError(f"{ckpt} holds no optimizer state")
        optimizer.load_state_dict(dense["optimizer"])
    for store in stores.values():
        parts = {p: store.read_partition(p) for p in range(store.spec.num_partitions)}
        backend.import_partitions(store.spec, parts)  # type: ignore[union-attr]
    logger.info("loaded checkpoint %s (step %s)", ckpt, dense["train"].get("step"))
    return dense["train"]


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns the deleted paths."""
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in doomed:
        (p / MANIFEST).unlink()  # first: a half-deleted directory must never look complete
        shutil.rmtree(p)
    return doomed
