"""Checkpoint directories, their manifest, and atomic file writes (DESIGN §5 "Checkpoint").

A checkpoint is `<root>/step-<N>/` holding the table groups at `tables/<name>/` (written by the
shards, each only its own partitions), the dense state written by the workers with
`atomic_write_bytes`, and `manifest.json`, written **last** and atomically (tmp file in the same
directory, fsync, rename, fsync of the directory). A directory without a valid manifest is an
unfinished checkpoint: it is never listed and never loaded.

The manifest is a JSON object; `write_manifest` adds `format`, `format_version`, `step`,
`created` and, unless the caller gives its own, `files`: every file under the step directory with
its size and sha256, so `verify_checkpoint` can prove that the directory still holds what was
written (docs/reliability.md §7). Writers that hash their files as they write them (a shard hashes
the chunks of its own partitions right after writing them, while they are in the page cache) hand
the digests to `write_manifest(known=...)`, so the manifest never re-reads a big table; whatever
is left is hashed in parallel. Verification is parallel too, and can be limited to some files
(`only=`): a restarted shard checks just its own partitions as it loads them.

Checkpoints written before every file had a sha256 (files over 1 MiB had only a size) are still
read; for them a file without a recorded sha256 is checked by size only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from storage.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ultramem.checkpoint"
FORMAT_VERSION = 1  # the newest manifest format this code reads and writes
TABLES = "tables"  # tables of a checkpoint live at step_dir / TABLES / <name>
HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib drops the GIL on big buffers: files hash in parallel
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint set aside by `set_aside` (never listed again)
_STEP_RE = re.compile(r"^step-(0|[1-9][0-9]*)$")
_TMP_SUFFIX = ".tmp"  # atomic writes use ".<name>.<random>.tmp" beside the target


# --- paths -------------------------------------------------------------------------------------


def step_dir(root: str | Path, step: int) -> Path:
    """root / f"step-{step}" (not created)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step must be an int >= 0, got {step!r}")
    return Path(root) / f"step-{step}"


def step_of(path: str | Path) -> int:
    """The step N of a directory named step-N; CheckpointError for any other name."""
    match = _STEP_RE.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path} is not a checkpoint directory name (step-<N>)")
    return int(match.group(1))


def table_path(step_path: str | Path, name: str) -> Path:
    """Where table `name` of a checkpoint lives: step_dir / "tables" / name."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"bad table name {name!r}")
    return Path(step_path) / TABLES / name


# --- atomic writes -----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Write a file atomically: yields a binary file; on a clean exit it is fsynced and renamed onto
    path (then the directory is fsynced); on an exception the temporary file is removed and path
    keeps its old content (or stays absent). Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; checkpoints are meant to be read by others
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path atomically (tmp in the same directory, fsync, rename, fsync directory)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write obj as JSON atomically; CheckpointError (nothing written) if obj is not strict JSON."""
    try:
        data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot write {path}: not JSON-serialisable: {err}") from err
    atomic_write_bytes(path, data)


# --- manifest ----------------------------------------------------------------------------------


def file_digest(path: str | Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex} of one file (hashlib.file_digest: one reused buffer, no copies)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        size = f.tell()
    return {"bytes": size, "sha256": digest.hexdigest()}


def digest_files(root: str | Path, paths: Iterable[str], threads: int = HASH_THREADS) -> dict[str, dict[str, Any]]:
    """file_digest of each root/path (posix paths relative to root), hashed in parallel threads."""
    root = Path(root)
    paths = list(paths)
    if len(paths) <= 1 or threads <= 1:
        return {p: file_digest(root / p) for p in paths}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(paths, pool.map(lambda p: file_digest(root / p), paths), strict=True))


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, full path) of every file under root except the manifest and unfinished
    atomic writes, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel != MANIFEST and not _is_tmp(name):
                yield rel, full


def list_files(step_path: str | Path, known: Mapping[str, Mapping[str, Any]] | None = None,
               threads: int = HASH_THREADS) -> list[dict[str, Any]]:
    """Every file under a step directory except the manifest and unfinished atomic writes:
    [{"path": relative posix path, "bytes": size, "sha256": hex}].

    known: digests the writers computed as they wrote ({path: {"bytes", "sha256"}}); a file whose
    size still matches is not read again. The rest is hashed in parallel.
    """
    root = Path(step_path)
    known = known or {}
    sizes = {rel: full.stat().st_size for rel, full in _walk(root)}
    reuse = {rel: dict(known[rel]) for rel, size in sizes.items()
             if rel in known and known[rel].get("bytes") == size and isinstance(known[rel].get("sha256"), str)}
    fresh = digest_files(root, [rel for rel in sizes if rel not in reuse], threads)
    return [{"path": rel, **(reuse.get(rel) or fresh[rel])} for rel in sizes]


def write_manifest(
    step_path: str | Path,
    manifest: dict[str, Any],
    *,
    record_files: bool = True,
    known: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write step_dir/manifest.json last and atomically, marking the checkpoint complete.

    Adds "format", "format_version", "step" (from the directory name), "created" (UTC ISO 8601)
    and, when record_files and the caller gave none, "files" (see `list_files`; `known` holds
    digests the writers already computed).
    Raises CheckpointError if the directory is missing or misnamed, or the manifest's own "step"
    disagrees with it, or the manifest is not JSON-serialisable.
    """
    step_path = Path(step_path)
    step = step_of(step_path)
    if not step_path.is_dir():
        raise CheckpointError(f"checkpoint directory {step_path} does not exist")
    if not isinstance(manifest, dict):
        raise CheckpointError(f"manifest must be a dict, got {type(manifest).__name__}")
    if manifest.get("step", step) != step:
        raise CheckpointError(f"manifest step {manifest['step']!r} disagrees with directory {step_path.name}")
    body = dict(manifest)
    body.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        step=step,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if record_files and "files" not in manifest:
        body["files"] = list_files(step_path, known)
    _check_entries(body.get("files", []), step_path)
    atomic_write_json(step_path / MANIFEST, body)
    logger.info("wrote manifest of checkpoint %s (%d files)", step_path, len(body.get("files", [])))


def _check_entries(files: object, step_path: Path) -> None:
    if not isinstance(files, list):
        raise CheckpointError(f"{step_path}: manifest 'files' must be a list")
    for entry in files:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry.get("bytes"), bool)
            and entry["bytes"] >= 0
            and isinstance(entry.get("sha256", ""), str)
        )
        if not ok:
            raise CheckpointError(f"{step_path}: bad manifest file entry {entry!r}")
        parts = Path(entry["path"]).parts
        if not parts or Path(entry["path"]).is_absolute() or ".." in parts:
            raise CheckpointError(f"{step_path}: manifest file path {entry['path']!r} leaves the checkpoint")


def read_manifest(step_path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError if missing, unreadable or invalid."""
    step_path = Path(step_path)
    step = step_of(step_path)
    path = step_path / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError as err:
        raise CheckpointError(f"{step_path} has no {MANIFEST}: an unfinished checkpoint") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt manifest {path}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} not in 1..{FORMAT_VERSION}")
    if manifest.get("step") != step or isinstance(manifest.get("step"), bool):
        raise CheckpointError(f"{path}: step {manifest.get('step')!r} disagrees with the directory name")
    if not isinstance(manifest.get("created"), str):
        raise CheckpointError(f"{path}: missing 'created'")
    _check_entries(manifest.get("files", []), step_path)
    return manifest


def check_files(step_path: str | Path, manifest: Mapping[str, Any], *, only: Callable[[str], bool] | None = None,
                required: Iterable[str] = (), threads: int = HASH_THREADS) -> list[str]:
    """What is wrong with a checkpoint's files against its manifest (empty: nothing).

    Every listed file (or, with `only`, every listed file whose path it accepts) must exist with its
    size and sha256; each path in `required` must be listed; a file under tables/ that the manifest
    does not list is wrong too (Zarr would read it as a chunk). Sizes first, then the hashes in
    parallel. Problems name the file: "tables/t/values/c/1/0/0: sha256 mismatch".
    """
    step_path = Path(step_path)
    entries = [e for e in manifest.get("files", []) if only is None or only(e["path"])]
    listed = {e["path"] for e in manifest.get("files", [])}
    problems = [f"{r}: not in the manifest" for r in required if r not in listed]
    to_hash = []
    for entry in entries:
        full = step_path / entry["path"]
        if not full.is_file():
            problems.append(f"{entry['path']}: missing")
        elif (size := full.stat().st_size) != entry["bytes"]:
            problems.append(f"{entry['path']}: {size} bytes, the manifest says {entry['bytes']}")
        elif "sha256" in entry:
            to_hash.append(entry)
    digests = digest_files(step_path, [e["path"] for e in to_hash], threads)
    problems += [f"{e['path']}: sha256 mismatch (same size, other bytes)" for e in to_hash
                 if digests[e["path"]]["sha256"] != e["sha256"]]
    if (step_path / TABLES).is_dir():
        problems += [f"{rel}: not in the manifest" for rel, _ in _walk(step_path)
                     if rel.startswith(f"{TABLES}/") and rel not in listed and (only is None or only(rel))]
    return problems


def verify_checkpoint(step_path: str | Path, *, only: Callable[[str], bool] | None = None,
                      required: Iterable[str] = (), threads: int = HASH_THREADS) -> dict[str, Any]:
    """read_manifest, then `check_files`; returns the manifest.

    Raises CheckpointError naming the checkpoint and the first few problems.
    """
    step_path = Path(step_path)
    manifest = read_manifest(step_path)
    if "files" not in manifest:
        raise CheckpointError(f"checkpoint {step_path}: its manifest lists no files, so nothing can be verified")
    problems = check_files(step_path, manifest, only=only, required=required, threads=threads)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"checkpoint {step_path} does not match its manifest: " + "; ".join(problems[:5]) + more)
    return manifest


# --- listing -----------------------------------------------------------------------------------


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root (valid manifest only), as (step, path) sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        if not child.is_dir() or not _STEP_RE.match(child.name):
            continue
        try:
            read_manifest(child)
        except CheckpointError as err:
            logger.debug("skipping incomplete checkpoint %s: %s", child, err)
            continue
        out.append((step_of(child), child))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under root, or None (files not verified)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Every step-<N> directory under root, complete or not, as (step, path) sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((step_of(c), c) for c in root.iterdir() if c.is_dir() and _STEP_RE.match(c.name))


@dataclass(frozen=True)
class CheckpointStatus:
    """One step directory and what, if anything, is wrong with it."""

    step: int
    path: Path
    problem: str | None  # None: valid (manifest reads, every file matches it)

    @property
    def valid(self) -> bool:
        return self.problem is None


def set_aside(step_path: str | Path) -> Path:
    """Rename a damaged or unfinished checkpoint to step-<N>.damaged (or .damaged-2, ...): it is never
    listed or loaded again, its step can be written afresh, and its files stay for inspection."""
    step_path = Path(step_path)
    target = step_path.with_name(step_path.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = step_path.with_name(f"{step_path.name}{DAMAGED_SUFFIX}-{n}")
    os.replace(step_path, target)
    _fsync_dir(step_path.parent)
    logger.warning("set aside damaged checkpoint %s as %s", step_path, target.name)
    return target
