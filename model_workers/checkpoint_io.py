"""A training run's checkpoint, written and read by one process (DESIGN §5 "Checkpoint").

`<root>/step-<N>/` holds:

    tables/<name>/    each memory table as a Zarr v3 group: values + sparse optimizer state
                      (storage/table_store.py), written partition by partition
    dense.pt          torch: {"model": state dict (π and the TDQKR filter are buffers in it),
                      "optimizer": AdamW state, "train": step, RNG state, data position}
    config.json       the resolved run config (a run is rebuilt from it)
    tokenizer.json    the tokenizer, so generation needs nothing but this directory
    manifest.json     written last (storage.checkpoint.write_manifest): without it the directory is
                      an unfinished checkpoint and is never loaded. It lists every file with its
                      size and sha256 (dense.pt included, hashed from the bytes before they are
                      written; table chunks hashed by their writers)

`find_checkpoint` is the door every load goes through (generate, serve, resume): it verifies the
files against the manifest and, given a run, falls back to the newest checkpoint that verifies,
with a warning naming each damaged one and why (docs/reliability.md §7). The readers below take
the step directory it returned.

The distributed trainer writes the same layout, with each shard writing its own partitions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_workers.values import LocalBackend
from storage.checkpoint import (
    MANIFEST,
    CheckpointStatus,
    atomic_write_bytes,
    atomic_write_json,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    set_aside,
    step_dir,
    step_dirs,
    step_of,
    table_path,
    verify_checkpoint,
    write_manifest,
)
from storage.errors import CheckpointError
from storage.table_store import create_table, open_table

logger = logging.getLogger(__name__)

DENSE = "dense.pt"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
KIND = "ultramem.local"  # manifest "kind" of a checkpoint written by this module
REQUIRED = (DENSE, CONFIG)  # files every checkpoint's manifest must list (tables: their zarr.json)


def required_files(manifest: Mapping[str, Any]) -> list[str]:
    """Paths a checkpoint with this manifest cannot be loaded without."""
    return [*REQUIRED, *(f"tables/{name}/zarr.json" for name in manifest.get("tables", []))]


def verify(path: str | Path) -> dict[str, Any]:
    """verify_checkpoint with this layout's required files; returns the manifest."""
    manifest = read_manifest(path)
    return verify_checkpoint(path, required=required_files(manifest))


def check(path: str | Path) -> CheckpointStatus:
    """What is wrong with one step directory (CheckpointStatus.problem), or that it is valid."""
    try:
        verify(path)
    except CheckpointError as err:
        return CheckpointStatus(step_of(path), Path(path), str(err))
    return CheckpointStatus(step_of(path), Path(path), None)


def reason(status: CheckpointStatus) -> str:
    """What is wrong with a checkpoint, without its own path (which the caller names)."""
    problem, path = status.problem or "", status.path
    for prefix in (f"checkpoint {path} ", f"{path / MANIFEST}: ", f"{path} "):
        if problem.startswith(prefix):
            return problem[len(prefix):]
    return problem.replace(f"{path}/", "")


def begin_checkpoint(path: Path) -> None:
    """Make an empty step directory; an unfinished one (no manifest) left by a crash is replaced, a
    damaged one (manifest unreadable, or files that do not match it) is set aside as step-N.damaged.

    Raises CheckpointError if a valid complete checkpoint already exists there.
    """
    if (path / MANIFEST).exists():
        status = check(path)
        if status.valid:
            raise CheckpointError(f"{path} is already a complete checkpoint")
        logger.warning("%s is damaged (%s); setting it aside before writing step %d again",
                       path, status.problem, status.step)
        set_aside(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def finish_checkpoint(path: Path, *, dense: dict[str, Any], train_state: dict[str, Any],
                      config: dict[str, Any], tokenizer_json: str | None, tables: list[str],
                      kind: str = KIND, known: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write dense.pt, config.json, tokenizer.json, then the manifest (last): the checkpoint now exists.

    `dense` is {"model": state dict, "optimizer": AdamW state or None}; the table groups named in
    `tables` must already be written under path/tables/. `known`: digests of files the writers
    hashed as they wrote them (the shards' chunks); dense.pt is hashed here from its bytes.
    """
    buf = io.BytesIO()
    torch.save({**dense, "train": train_state}, buf)
    data = buf.getvalue()
    atomic_write_bytes(path / DENSE, data)
    known = {**(known or {}), DENSE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    atomic_write_json(path / CONFIG, config)
    if tokenizer_json is not None:
        atomic_write_bytes(path / TOKENIZER, tokenizer_json.encode("utf-8"))
    write_manifest(path, {"kind": kind, "tables": list(tables)}, known=known)
    logger.info("wrote checkpoint %s", path)


def save_checkpoint(root: str | Path, step: int, *, model: nn.Module, backend: LocalBackend | None,
                    optimizer: torch.optim.Optimizer | None, train_state: dict[str, Any],
                    config: dict[str, Any], tokenizer_json: str | None = None) -> Path:
    """Write `<root>/step-<step>/` (manifest last) and return it.

    An existing valid checkpoint of that step is kept as is; an unfinished one is replaced, a
    damaged one set aside (begin_checkpoint).
    """
    path = step_dir(root, step)
    if (path / MANIFEST).exists() and check(path).valid:
        return path
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
    """The checkpoint to load from a step dir, a checkpoints root, or a run dir, verified.

    A step directory must verify (manifest, every file's size and sha256): CheckpointError naming
    what is wrong otherwise. For a run or a checkpoints root, the newest checkpoint that verifies
    wins; each newer one that does not is named in a warning with the reason. CheckpointError when
    none verifies.
    """
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("step-"):
        verify(path)
        return path
    damaged: list[CheckpointStatus] = []
    for root in (path / "checkpoints", path):
        found, bad = _newest_valid(root)
        damaged += bad
        for status in bad:
            logger.warning("checkpoint %s is damaged, not loading it: %s", status.path, reason(status))
        if found is not None:
            if damaged:
                logger.warning("using %s, the newest valid checkpoint", found)
            return found
    if damaged:
        raise CheckpointError(f"no valid checkpoint in {path}: " + "; ".join(s.problem or "" for s in damaged[:3]))
    raise CheckpointError(f"no complete checkpoint in {path}")


def _newest_valid(root: Path) -> tuple[Path | None, list[CheckpointStatus]]:
    """(the newest step directory under root that verifies, or None; the newer ones that did not)."""
    damaged = []
    for _, p in reversed(step_dirs(root)):
        status = check(p)
        if status.valid:
            return p, damaged
        damaged.append(status)
    return None, damaged


def set_aside_newer(checkpoint: Path) -> list[Path]:
    """Set aside (step-N.damaged) every step directory beside `checkpoint` with a higher step and a
    manifest; returns their new paths. After find_checkpoint fell back to `checkpoint`, all of them
    are damaged: a run resumed from it must not meet them again (a restarted shard loads the newest
    complete checkpoint; the trainer would find the step taken). Unfinished ones (no manifest) are
    left for begin_checkpoint to replace."""
    step = step_of(checkpoint)
    return [set_aside(p) for s, p in step_dirs(checkpoint.parent) if s > step and (p / MANIFEST).exists()]


def resume_point(path: str | Path, run_dir: str | Path) -> Path:
    """The checkpoint a run in `run_dir` resumes from: find_checkpoint(path) (verified), then
    set_aside_passed: the resumed run never meets the damaged checkpoints it fell back past."""
    found = find_checkpoint(path)
    set_aside_passed(path, found, run_dir)
    return found


def set_aside_passed(given: str | Path, found: Path, run_dir: str | Path) -> list[Path]:
    """When `given` is a run (not one step-N) and find_checkpoint(given) returned `found` in
    run_dir/checkpoints, set aside the newer step directories it fell back past (set_aside_newer);
    a run resumed into another directory, or from a step the user named, touches nothing."""
    given = Path(given)
    named_a_step = (given / MANIFEST).exists() or given.name.startswith("step-")
    if named_a_step or found.parent.resolve() != (Path(run_dir) / "checkpoints").resolve():
        return []
    return set_aside_newer(found)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None (files not verified)."""
    return latest_checkpoint(root)


def read_config(path: str | Path) -> dict[str, Any]:
    """The run config saved in a checkpoint (a step dir from find_checkpoint, or a run dir)."""
    ckpt = _step(path)
    try:
        return json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {ckpt / CONFIG}: {err}") from err


def read_dense(path: str | Path) -> dict[str, Any]:
    """The dense.pt of a checkpoint: {"model", "optimizer", "train"} (on the CPU)."""
    ckpt = _step(path)
    try:
        return torch.load(io.BytesIO((ckpt / DENSE).read_bytes()), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError... for a bad file
        raise CheckpointError(f"cannot read {ckpt / DENSE}: {type(err).__name__}: {_first_line(err)}") from err


def _step(path: str | Path) -> Path:
    """A step directory as is (find_checkpoint verified it); anything else through find_checkpoint."""
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("step-"):
        read_manifest(path)  # an unfinished checkpoint is never read
        return path
    return find_checkpoint(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def load_checkpoint(path: str | Path, model: nn.Module, *, backend: LocalBackend | None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load dense state (and AdamW state when `optimizer` is given) and every table into `backend`.

    `path`: a step directory that find_checkpoint returned (verified), or a run dir (found and
    verified here). Returns the saved train state ({"step", "rng", "data"}). Raises CheckpointError
    for an unfinished checkpoint, a file that cannot be read (naming it), and before touching
    anything when the tables do not match the model's.
    """
    ckpt = _step(path)
    manifest = read_manifest(ckpt)
    specs = backend.tables() if backend is not None else {}
    have = set(manifest.get("tables", []))
    if set(specs) != have:
        raise CheckpointError(f"{ckpt}: tables {sorted(have)} do not match the model's {sorted(specs)}")
    stores = {}
    for name in sorted(have):
        try:
            stores[name] = open_table(table_path(ckpt, name))
        except Exception as err:  # zarr / json errors of a damaged group
            raise CheckpointError(f"cannot open table {table_path(ckpt, name)}: {type(err).__name__}: "
                                  f"{_first_line(err)}") from err
    for name, store in stores.items():
        if (store.spec.rows, store.spec.dim) != (specs[name].rows, specs[name].dim):
            raise CheckpointError(f"{ckpt}: table {name} is {store.spec.rows}x{store.spec.dim}, the model "
                                  f"wants {specs[name].rows}x{specs[name].dim}")
    dense = read_dense(ckpt)
    parts = {name: _read_partitions(store) for name, store in stores.items()}  # read all, then change anything

    model.load_state_dict(dense["model"])
    if optimizer is not None:
        if dense["optimizer"] is None:
            raise CheckpointError(f"{ckpt} holds no optimizer state")
        optimizer.load_state_dict(dense["optimizer"])
    for name, store in stores.items():
        backend.import_partitions(store.spec, parts[name])  # type: ignore[union-attr]
    logger.info("loaded checkpoint %s (step %s)", ckpt, dense["train"].get("step"))
    return dense["train"]


def _read_partitions(store: Any) -> dict[int, dict[str, Any]]:
    out = {}
    for p in range(store.spec.num_partitions):
        try:
            out[p] = store.read_partition(p)
        except Exception as err:  # numpy reshape, zstd, OSError of a damaged chunk
            raise CheckpointError(f"cannot read partition {p} of table {store.path}: {type(err).__name__}: "
                                  f"{_first_line(err)}") from err
    return out


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns the deleted paths."""
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in doomed:
        (p / MANIFEST).unlink()  # first: a half-deleted directory must never look complete
        shutil.rmtree(p)
    return doomed
