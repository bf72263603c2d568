"""Whole-chunk reads and writes of a table group, many at once (DESIGN §5 chunk cache, §8).

The chunk cache (storage/chunk_cache.py) moves whole chunks between RAM and the table's Zarr v3
group: it loads a chunk on a miss and writes a dirty one back on eviction or flush. This module is
that I/O, batched: a list of chunk spans goes down in one call. `ChunkIO.write_rows` writes
scattered rows (the row cache's evicted rows, whose chunk is not held): the raw engine writes them
into their chunk files in place, one `pwrite` per run of consecutive rows; the others rewrite the
chunks they fall in.

Three engines, chosen by `open_chunk_io(store, engine)`:

- `RawChunkIO` ("raw", the default): for arrays whose codec chain is only the `bytes` codec
  (little-endian, no compressor, filter or transpose; fill value 0), a chunk file *is* the chunk's
  C-order bytes, so a chunk is read with one `os.preadv` straight into a preallocated numpy buffer
  and written **in place** with `os.pwrite`: no new file, no rename. A missing chunk file reads as
  the fill value 0 (zarr-python and TensorStore never write all-fill chunks); writing one creates
  it (and its directories) at full chunk size. The file of a chunk comes from the array's own
  metadata (`ArrayV3Metadata.encode_chunk_key`: key encoding and separator), never from a layout
  written here. Open file descriptors are kept in a bounded LRU (`max_open_files`) and released by
  `close()`, which the owner calls (`CachedTablePartitions`; a `CachedPartitions` that opened its
  own engine), and again when chunk files may have been replaced behind the engine's back (a
  partition added or removed: zarr-python and TensorStore write a new file and rename it, so an
  old descriptor would point at the unlinked one). Arrays that are not raw (zstd optimizer state
  in a table created with `compress_state=True`) fall back, per array, to TensorStore (zarr-python
  when it is missing), so the engine serves any of our tables; `engines` says which array went where.
  Measured on the loaded 2-core machine (2026-12, page-cache-warm files, bench/beyond_ram.py): a
  whole-chunk write through TensorStore costs 0.3-1.3 ms, 100-200 MB/s; an in-place `pwrite` into
  the page cache moves ~1 GB/s or more.
- `TensorStoreChunkIO`: the arrays opened through TensorStore's `zarr3` driver; every chunk of a
  batch is issued as a future, then all are awaited. TensorStore's own chunk cache is off
  (`cache_pool` 0: the RAM budget is ours to account for) and so is its per-file fsync.
- `ZarrChunkIO`: the store's own zarr-python reader and writer, one chunk at a time (~1 ms each).

**Why writing in place is safe here.** A torn chunk (a crash in the middle of a `pwrite`) would be
a problem only if someone read the work store back after the crash, and nobody does:
1. The shard's work store is not a checkpoint. Checkpoints are separate table groups that
   `Shard.save` fills while pushes are held, with an fsynced manifest written last
   (storage/checkpoint.py); a checkpoint without a valid manifest is never loaded.
2. A restarted shard reloads from its checkpoint and replays its log (param_server/actor.py
   `_load`, `_open_log`): the newest valid checkpoint is the source of every partition, cached ones
   are copied from it into the work store (`Shard.load_table` -> `copy_partition`), or, before the
   first checkpoint, re-initialised from their seed (`initialize_partitions`, `zero_state`); then
   the update log replays the pushes acknowledged since. orchestration/distributed.py resumes the
   same way (`--resume`: tables from the checkpoint, the work groups rewritten by the shards).
   A row written alone (`write_rows`) is the same in-place write on a smaller span: a crash can
   leave a chunk with some of a batch's rows new and others old, which the same reload replaces.
3. One writer per chunk: chunks never straddle partitions (storage/layout.py), each partition has
   one owner, and all access to a table's chunks goes through one cache under its lock (the engine
   takes its own lock too). A partition handed to another shard is flushed, and its descriptors
   closed, before the new owner reads it.
The one store served without a checkpoint beneath it is `ultramem shard serve --ram-budget-mb`
over a user's table: there a crash already left a mix of chunks from different steps (dirty chunks
go back at eviction, in any order), and in-place writes only add that one chunk may be torn.

The on-disk format is untouched: all engines read and write plain Zarr v3 chunks that zarr-python
and TensorStore read (bfloat16 values as uint16 bits, `layout.to_storage`). A span is
(partition, first local row, stop); spans never straddle partitions.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

try:  # imported with the module, so a shard's baseline RSS already holds the library (~17 MB)
    import tensorstore as ts
except ImportError:  # pragma: no cover - the zarr-python fallback below
    ts = None

from zarr.codecs import BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata.v3 import ArrayV3Metadata

from storage.errors import LayoutError, ReadOnlyTableError
from storage.layout import ArrayLayout, from_storage, table_arrays, to_storage
from storage.table_store import TableStore

logger = logging.getLogger(__name__)

Span = tuple[int, int, int]  # (partition, first local row, stop): rows [start, stop) of partition p
WriteItem = tuple[str, int, int, np.ndarray]  # (array name, partition, first local row, data [n, ...])
Engine = Literal["raw", "tensorstore", "zarr"]
ENGINES: tuple[str, ...] = ("raw", "tensorstore", "zarr")
MAX_OPEN_FILES = 256  # chunk files a RawChunkIO keeps open (LRU); also capped by RLIMIT_NOFILE / 8


class ChunkIO(ABC):
    """Batched whole-chunk I/O over one table group; counts seconds and bytes moved."""

    engine: str

    def __init__(self, store: TableStore, names: Sequence[str] | None = None) -> None:
        self.store = store
        self._layouts = table_arrays(store.spec)
        self.names: tuple[str, ...] = tuple(names) if names is not None else store.array_names
        self.engines: dict[str, str] = dict.fromkeys(self.names, self.engine)  # array -> engine serving it
        self._chunk_rows_of: dict[str, int] = {}
        self.counters = {"read_s": 0.0, "write_s": 0.0, "read_bytes": 0, "write_bytes": 0,
                         "read_ops": 0, "write_ops": 0}

    def read(self, name: str, spans: Sequence[Span]) -> list[np.ndarray]:
        """Read spans of array `name` -> one fresh array [stop - start, ...] per span, logical dtype."""
        if not spans:
            return []
        t0 = time.perf_counter()
        out = self._read(name, spans)
        self.counters["read_s"] += time.perf_counter() - t0
        self.counters["read_bytes"] += sum(a.nbytes for a in out)
        self.counters["read_ops"] += len(spans)
        return out

    def write(self, items: Sequence[WriteItem]) -> None:
        """Write (array name, partition, first local row, data [n, ...]) items: rows [start, start + n)."""
        if not items:
            return
        if self.store.read_only:
            raise ReadOnlyTableError(f"table {self.store.spec.name} at {self.store.path} is open read-only")
        t0 = time.perf_counter()
        self._write(items)
        self.counters["write_s"] += time.perf_counter() - t0
        self.counters["write_bytes"] += sum(d.nbytes for *_, d in items)
        self.counters["write_ops"] += len(items)

    def read_rows(self, name: str, part: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Read scattered rows of array `name`: local rows local[i] of partitions part[i] (int [n]
        each; unique pairs, any order, valid rows) -> one fresh array [n, ...] in the logical dtype.

        The raw engine reads each run of consecutive rows with one `preadv` from its chunk file
        (a missing file reads as 0); the others read the spans of the runs."""
        layout = self._layouts[name]
        if len(part) == 0:
            return from_storage(np.empty((0, *layout.trailing), dtype=layout.storage_dtype), layout.dtype)
        part, local, order, firsts, stops = self._runs(name, part, local)
        t0 = time.perf_counter()
        out = self._read_runs(name, part[firsts], local[firsts], firsts, stops)
        if order is not None:  # back to request order
            got, out = out, np.empty_like(out)
            out[order] = got
        self.counters["read_s"] += time.perf_counter() - t0
        self.counters["read_bytes"] += out.nbytes
        self.counters["read_ops"] += len(firsts)
        return from_storage(out, layout.dtype)

    def _runs(self, name: str, part: np.ndarray, local: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """Rows sorted by (partition, local) and cut into runs of consecutive rows inside one chunk:
        (part, local) sorted, the sort order (None: already sorted), first and stop of every run."""
        part, local = np.asarray(part, dtype=np.int64), np.asarray(local, dtype=np.int64)
        key = part * self.store.spec.rows_per_partition + local
        order = None
        if len(key) > 1 and (key[1:] <= key[:-1]).any():
            order = np.argsort(key, kind="stable")
            part, local, key = part[order], local[order], key[order]
        chunk = local // self._chunk_rows(name)
        breaks = np.flatnonzero((key[1:] != key[:-1] + 1) | (chunk[1:] != chunk[:-1]) | (part[1:] != part[:-1])) + 1
        return part, local, order, np.concatenate(([0], breaks)), np.concatenate((breaks, [len(key)]))

    def _chunk_rows(self, name: str) -> int:
        rows = self._chunk_rows_of.get(name)
        if rows is None:
            rows = self._chunk_rows_of[name] = self.store.chunk_shape(name)[1]
        return rows

    def _read_runs(self, name: str, parts: np.ndarray, starts: np.ndarray, firsts: np.ndarray,
                   stops: np.ndarray) -> np.ndarray:
        """Rows [starts[j], starts[j] + stops[j] - firsts[j]) of partition parts[j], every run j in
        order -> one array [stops[-1], ...] in the storage dtype."""
        spans = [(p, s, s + b - a) for p, s, a, b in zip(parts.tolist(), starts.tolist(), firsts.tolist(),
                                                         stops.tolist(), strict=True)]
        return np.concatenate([to_storage(x) for x in self._read(name, spans)])

    def write_rows(self, name: str, part: np.ndarray, local: np.ndarray, data: np.ndarray) -> None:
        """Write scattered rows of array `name`: row i of `data` [n, ...] to local row local[i] of
        partition part[i] (int [n] each; unique (partition, row) pairs, any order).

        Only those rows change on disk; the raw engine writes each run of consecutive rows with one
        `pwrite` into its chunk file, in place (`writes_in_place`), the others rewrite the chunks
        the rows fall in. Raises: ReadOnlyTableError when the store is open read-only.
        """
        if len(part) == 0:
            return
        if self.store.read_only:
            raise ReadOnlyTableError(f"table {self.store.spec.name} at {self.store.path} is open read-only")
        part, local, order, firsts, stops = self._runs(name, part, local)
        t0 = time.perf_counter()
        self._write_runs(name, part[firsts], local[firsts], firsts, stops, data if order is None else data[order])
        self.counters["write_s"] += time.perf_counter() - t0
        self.counters["write_bytes"] += data.nbytes
        self.counters["write_ops"] += len(firsts)

    def writes_in_place(self, name: str) -> bool:
        """Whether `write_rows` of array `name` writes only the rows (no chunk is rewritten)."""
        return False

    def _write_runs(self, name: str, parts: np.ndarray, starts: np.ndarray, firsts: np.ndarray,
                    stops: np.ndarray, data: np.ndarray) -> None:
        """Rows data[firsts[j]:stops[j]] to rows [starts[j], ...) of partition parts[j], for every run j."""
        self._write([(name, int(p), int(s), data[a:b])
                     for p, s, a, b in zip(parts.tolist(), starts.tolist(), firsts.tolist(), stops.tolist(),
                                           strict=True)])

    def open_files(self) -> int:
        """File descriptors held open between calls (0 for engines that keep none)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook: only the raw engine holds files open
        """Release open files; a later call reopens what it needs (so calling it twice is harmless)."""

    @abstractmethod
    def _read(self, name: str, spans: Sequence[Span]) -> list[np.ndarray]: ...

    @abstractmethod
    def _write(self, items: Sequence[WriteItem]) -> None: ...


class TensorStoreChunkIO(ChunkIO):
    """Chunk I/O through TensorStore's zarr3 driver: a batch is issued as futures, then awaited."""

    engine = "tensorstore"

    def __init__(self, store: TableStore, names: Sequence[str] | None = None, *, concurrency: int = 4) -> None:
        """Open `names` (default: every array) of `store`; ImportError when TensorStore is missing."""
        if ts is None:
            raise ImportError("tensorstore is not installed")
        super().__init__(store, names)
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                              "file_io_concurrency": {"limit": concurrency},
                              "file_io_sync": False, "data_copy_concurrency": {"limit": 1}})
        self._arrays = {}
        for name in self.names:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store.array_path(name))}}
            self._arrays[name] = ts.open(spec, read=True, write=not store.read_only, open=True,
                                         context=context).result()

    def _read(self, name: str, spans: Sequence[Span]) -> list[np.ndarray]:
        arr, dtype = self._arrays[name], self._layouts[name].dtype
        futures = [arr[p, start:stop].read() for p, start, stop in spans]
        return [from_storage(np.asarray(f.result()), dtype) for f in futures]

    def _write(self, items: Sequence[WriteItem]) -> None:
        futures = [self._arrays[name][p, start:start + len(data)].write(to_storage(np.ascontiguousarray(data)))
                   for name, p, start, data in items]
        for f in futures:
            f.result()


class ZarrChunkIO(ChunkIO):
    """Chunk I/O through the store's zarr-python arrays, one chunk op at a time (the last fallback)."""

    engine = "zarr"

    def _read(self, name: str, spans: Sequence[Span]) -> list[np.ndarray]:
        return [self.store.read_rows(p, np.arange(start, stop), names=[name])[name] for p, start, stop in spans]

    def _write(self, items: Sequence[WriteItem]) -> None:
        for name, p, start, data in items:
            self.store.write_rows(p, np.arange(start, start + len(data)), {name: data})


@dataclass(frozen=True)
class _RawArray:
    """What the raw engine needs of one array: where its chunk files are and how rows sit in them."""

    directory: Path  # the array's directory; chunk keys are relative to it
    metadata: ArrayV3Metadata  # encode_chunk_key: the array's own key encoding and separator
    layout: ArrayLayout
    chunk_rows: int
    row_bytes: int  # bytes of one row in the file (storage dtype)
    chunk_nbytes: int  # size of every chunk file (edge chunks are stored full size too)


def raw_layout_problem(metadata: ArrayV3Metadata, layout: ArrayLayout) -> str | None:
    """Why an array's chunk files are not its plain little-endian bytes (None: they are)."""
    codecs = tuple(metadata.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return f"codecs {[type(c).__name__ for c in codecs]}, not only bytes"
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if endian not in (None, "little") or (endian is None and layout.storage_dtype.itemsize > 1):
        return f"bytes codec endian {endian!r}"
    if sys.byteorder != "little":
        return "this machine is big-endian"
    if metadata.storage_transformers:
        return "storage transformers"
    if not isinstance(metadata.chunk_grid, RegularChunkGrid):
        return f"chunk grid {type(metadata.chunk_grid).__name__}"
    if np.dtype(metadata.data_type.to_native_dtype()).newbyteorder("<") != layout.storage_dtype.newbyteorder("<"):
        return f"data type {metadata.data_type}"
    if np.asarray(metadata.fill_value).astype(layout.storage_dtype).tobytes() != bytes(layout.storage_dtype.itemsize):
        return f"fill value {metadata.fill_value!r} (a missing chunk must read as zero bytes)"
    return None


def _close_fds(fds: OrderedDict[tuple[str, int, int], int]) -> None:
    while fds:
        os.close(fds.popitem(last=False)[1])


class RawChunkIO(ChunkIO):
    """Chunk I/O with `pread`/`pwrite` on the chunk files of raw arrays, in place; the rest falls back."""

    engine = "raw"

    def __init__(self, store: TableStore, *, max_open_files: int = MAX_OPEN_FILES,
                 fallback: Literal["tensorstore", "zarr"] | None = None) -> None:
        """Serve the raw arrays of `store` in place and the others through `fallback`.

        Args:
            store: the table group (read-only stores open files read-only and refuse writes).
            max_open_files: chunk files kept open between calls (least recently used closed first).
            fallback: engine for arrays that are not raw; default TensorStore, zarr-python without it.
        Raises: LayoutError for max_open_files < 1 or an unknown fallback.
        """
        super().__init__(store)
        if isinstance(max_open_files, bool) or not isinstance(max_open_files, int) or max_open_files < 1:
            raise LayoutError(f"max_open_files must be an int >= 1, got {max_open_files!r}")
        if fallback not in (None, "tensorstore", "zarr"):
            raise LayoutError(f"fallback engine must be 'tensorstore' or 'zarr', got {fallback!r}")
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_open_files = max(1, min(max_open_files, soft // 8)) if soft > 0 else max_open_files
        self._raw: dict[str, _RawArray] = {}
        others = []
        for name in store.array_names:
            metadata, layout = store.array_metadata(name), self._layouts[name]
            problem = raw_layout_problem(metadata, layout)
            if problem is not None:
                others.append(name)
                logger.debug("table %s array %s is not raw (%s): it falls back", store.spec.name, name, problem)
                continue
            rows = store.chunk_shape(name)[1]
            row_bytes = int(np.prod(layout.trailing, dtype=np.int64)) * layout.storage_dtype.itemsize
            self._raw[name] = _RawArray(store.array_path(name), metadata, layout, rows, row_bytes, rows * row_bytes)
        self._fallback = _open_fallback(store, others, fallback) if others else None
        for name in others:
            self.engines[name] = self._fallback.engine  # type: ignore[union-attr]
        self._fds: OrderedDict[tuple[str, int, int], int] = OrderedDict()  # (array, p, chunk) -> fd, LRU first
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)  # an owner that forgets close()

    def open_files(self) -> int:
        with self._lock:
            return len(self._fds)

    def close(self) -> None:
        with self._lock:
            _close_fds(self._fds)

    def _read(self, name: str, spans: Sequence[Span]) -> list[np.ndarray]:
        a = self._raw.get(name)
        if a is None:
            return self._fallback._read(name, spans)  # type: ignore[union-attr]
        out = []
        with self._lock:
            for p, start, stop in spans:
                buf = np.empty((stop - start, *a.layout.trailing), dtype=a.layout.storage_dtype)
                flat = memoryview(buf).cast("B")  # buf is C-contiguous: its bytes are the rows in order
                for c, lo, hi in _pieces(start, stop, a.chunk_rows):
                    part = flat[(lo - start) * a.row_bytes:(hi - start) * a.row_bytes]
                    fd = self._fd(a, name, p, c, create=False)
                    if fd is None:  # never written: the fill value
                        buf[lo - start:hi - start] = 0
                        continue
                    got = os.preadv(fd, [part], (lo - c * a.chunk_rows) * a.row_bytes)
                    if got != len(part):
                        raise LayoutError(f"table {self.store.spec.name}: chunk file {self._path(a, p, c)} is "
                                          f"shorter than {a.chunk_nbytes} B (truncated?)")
                out.append(from_storage(buf, a.layout.dtype))
        return out

    def _write(self, items: Sequence[WriteItem]) -> None:
        other = [item for item in items if item[0] not in self._raw]
        with self._lock:
            for name, p, start, data in items:
                a = self._raw.get(name)
                if a is None:
                    continue
                flat = memoryview(np.ascontiguousarray(to_storage(data))).cast("B")
                for c, lo, hi in _pieces(start, start + len(data), a.chunk_rows):
                    part = flat[(lo - start) * a.row_bytes:(hi - start) * a.row_bytes]
                    fd = self._fd(a, name, p, c, create=True)
                    assert fd is not None
                    written = os.pwrite(fd, part, (lo - c * a.chunk_rows) * a.row_bytes)
                    if written != len(part):  # a regular file short-writes only when the disk is full
                        raise OSError(f"short write to {self._path(a, p, c)}: {written} of {len(part)} B")
        if other:
            self._fallback._write(other)  # type: ignore[union-attr]

    def writes_in_place(self, name: str) -> bool:
        return name in self._raw

    def _write_runs(self, name: str, parts: np.ndarray, starts: np.ndarray, firsts: np.ndarray,
                    stops: np.ndarray, data: np.ndarray) -> None:
        a = self._raw.get(name)
        if a is None:
            self._fallback._write_runs(name, parts, starts, firsts, stops, data)  # type: ignore[union-attr]
            return
        rows, rb = a.chunk_rows, a.row_bytes  # runs never cross a chunk boundary (write_rows)
        chunk = starts // rows
        offset = (starts - chunk * rows) * rb
        flat = memoryview(np.ascontiguousarray(to_storage(data))).cast("B")
        pwrite = os.pwrite
        with self._lock:
            key, fd = None, -1
            for p, c, off, lo, hi in zip(parts.tolist(), chunk.tolist(), offset.tolist(), (firsts * rb).tolist(),
                                         (stops * rb).tolist(), strict=True):
                if key != (p, c):  # runs arrive sorted: one descriptor look-up per chunk
                    key = (p, c)
                    fd = self._fd(a, name, p, c, create=True)  # type: ignore[assignment]
                written = pwrite(fd, flat[lo:hi], off)
                if written != hi - lo:  # a regular file short-writes only when the disk is full
                    raise OSError(f"short write to {self._path(a, p, c)}: {written} of {hi - lo} B")

    def _read_runs(self, name: str, parts: np.ndarray, starts: np.ndarray, firsts: np.ndarray,
                   stops: np.ndarray) -> np.ndarray:
        a = self._raw.get(name)
        if a is None:
            return self._fallback._read_runs(name, parts, starts, firsts, stops)  # type: ignore[union-attr]
        rows, rb = a.chunk_rows, a.row_bytes
        out = np.empty((int(stops[-1]), *a.layout.trailing), dtype=a.layout.storage_dtype)
        flat = memoryview(out).cast("B")
        chunk = starts // rows
        offset = (starts - chunk * rows) * rb
        preadv = os.preadv
        with self._lock:
            key, fd = None, None
            for p, c, off, lo, hi in zip(parts.tolist(), chunk.tolist(), offset.tolist(), (firsts * rb).tolist(),
                                         (stops * rb).tolist(), strict=True):
                if key != (p, c):  # runs arrive sorted: one descriptor look-up per chunk
                    key = (p, c)
                    fd = self._fd(a, name, p, c, create=False)
                if fd is None:  # never written: the fill value
                    out[lo // rb:hi // rb] = 0
                    continue
                if preadv(fd, [flat[lo:hi]], off) != hi - lo:
                    raise LayoutError(f"table {self.store.spec.name}: chunk file {self._path(a, p, c)} is "
                                      f"shorter than {a.chunk_nbytes} B (truncated?)")
        return out

    def _path(self, a: _RawArray, p: int, c: int) -> Path:
        coords = (p, c, *(0 for _ in a.layout.trailing))
        return a.directory / a.metadata.encode_chunk_key(coords)

    def _fd(self, a: _RawArray, name: str, p: int, c: int, *, create: bool) -> int | None:
        """Open descriptor of chunk c of partition p (most recently used now); None if missing and not create."""
        key = (name, p, c)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        path = self._path(a, p, c)
        try:
            fd = os.open(path, os.O_RDONLY if self.store.read_only else os.O_RDWR)
        except FileNotFoundError:
            if not create:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(fd).st_size < a.chunk_nbytes:  # full size at once: the rest reads as 0, the fill value
                os.ftruncate(fd, a.chunk_nbytes)
        self._fds[key] = fd
        while len(self._fds) > self.max_open_files:
            os.close(self._fds.popitem(last=False)[1])
        return fd


def _pieces(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int, int]]:
    """Rows [start, stop) split at chunk boundaries -> (chunk, lo, hi) with [lo, hi) inside that chunk."""
    out = []
    lo = start
    while lo < stop:
        c = lo // chunk_rows
        hi = min(stop, (c + 1) * chunk_rows)
        out.append((c, lo, hi))
        lo = hi
    return out


def _open_fallback(store: TableStore, names: Sequence[str], engine: str | None) -> ChunkIO:
    if engine == "zarr":
        return ZarrChunkIO(store, names)
    try:
        return TensorStoreChunkIO(store, names)
    except ImportError:
        if engine == "tensorstore":
            raise
        logger.warning("tensorstore is not installed: compressed arrays fall back to zarr-python (~5x slower)")
        return ZarrChunkIO(store, names)


def open_chunk_io(store: TableStore, engine: Engine | None = None) -> ChunkIO:
    """Chunk I/O over `store`: by default raw (in place) for raw arrays and TensorStore for the rest.

    engine "tensorstore" or "zarr" forces that engine for every array (side-by-side measurements);
    "raw" or None is the default. Spans must end at or before `valid_rows(p)` (zarr-python refuses
    padding rows). Raises: LayoutError for an unknown engine; ImportError for "tensorstore" without it.
    """
    if engine not in (None, *ENGINES):
        raise LayoutError(f"chunk I/O engine must be one of {ENGINES}, got {engine!r}")
    if engine == "zarr":
        return ZarrChunkIO(store)
    if engine == "tensorstore":
        return TensorStoreChunkIO(store)
    io = RawChunkIO(store)
    logger.debug("table %s chunk I/O engines: %s", store.spec.name, io.engines)
    return io
