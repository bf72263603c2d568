"""A bounded chunk cache with write-back over a `TableStore` (DESIGN §5 "chunk cache", §8).

A shard whose partitions do not fit its RAM budget serves them through `CachedPartitions`: rows
are read and written in RAM, but only the Zarr chunks recently touched are held, at most
`budget_bytes` of chunk data in all, least recently used first out. A chunk that was written is
*dirty*: it goes back to the store when it is evicted or on `flush()`, as one whole chunk
written by this cache, the single owner of its partitions (DESIGN §5: one writer per chunk; the
last chunk of a partition that ends in a padding row is written without it: that row is never
served and stays 0). Rows written with `write_rows(load=False)` (the row cache's evicted rows)
whose chunk is not held go straight into the chunk file instead, in place, by the same single
writer (raw arrays, `storage/chunk_io.py`): a chunk that is not held has its latest bytes on disk,
so loading it to change a few rows and writing it back whole later is not needed.

Values and optimizer state go through the same cache; each array has its own chunk grid
(`TableStore.chunk_shape`), so a cache entry is one (array, partition, chunk) and the budget
covers them all. Requests are vectorised: rows are grouped by chunk (one stable sort, none when
they arrive in (partition, local) order, as from `update_rows` and the row cache), chunks already
resident are served first (so loading a miss never evicts a chunk this request still needs), then
the missing chunks are loaded in batches that fit the budget: the least recently used chunks are
evicted (the dirty ones written back in one batch), the batch is read in one call, and
rows are gathered or scattered with numpy fancy indexing. `update_rows` (the cached optimizer
step) reads, changes and writes rows in one visit per chunk, batch by batch, each batch's chunks of
every array fitting the budget together. The batched I/O is `storage/chunk_io.py`: by default
`pread`/`pwrite` in place on the chunk files of raw (uncompressed) arrays, TensorStore for
compressed ones; the engine serving each array is in `metrics()` (`io_raw_arrays`, `io_engine.*`).
The cache owns an engine it opened itself and releases its files in `close()`; one handed in
(`io=ChunkIO`) belongs to the caller (`CachedTablePartitions` keeps one for a table's life).

Rows are global rows (row r of the table lives in partition r % NP at local row r // NP,
DESIGN §4.1), the same numbering the shard receives on the wire. One lock makes every public
method safe to call from several threads (gRPC handlers and the apply loop).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from storage.chunk_io import ENGINES, ChunkIO, Engine, open_chunk_io
from storage.errors import LayoutError, ReadOnlyTableError
from storage.layout import check_partition, table_arrays
from storage.table_store import TableStore

logger = logging.getLogger(__name__)


# read_rows(load=False) reads the rows of a chunk that is not held from its file one run at a time
# when they are at most this share of the chunk's rows, and loads the chunk when there are more
IN_PLACE_READ_SHARE = 1 / 16

RowUpdate = Callable[[dict[str, np.ndarray], np.ndarray], None]  # (block {name: [k, ...]}, positions [k])
RowUpdateAt = Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray], None]  # (arrays, index [k], positions [k])


@dataclass
class _Chunk:
    """One resident chunk: rows [start, start + len(data)) of one array of one partition."""

    data: np.ndarray  # [chunk rows, *trailing] in the array's logical dtype (padding rows included)
    dirty: bool = False  # written since it was loaded: must be written back before it is dropped


@dataclass(frozen=True)
class _Group:
    """A request's rows grouped by chunk of one array (`CachedPartitions._group`)."""

    codes: list[int]  # the chunks touched, ascending: partition * chunks_per_partition + chunk
    bounds: list[int]  # chunk i holds sorted positions [bounds[i], bounds[i + 1])
    order: np.ndarray | None  # sorted position -> request position (None: the request was sorted)
    offset: np.ndarray  # int64 [N] row inside its chunk, in sorted order


def _copy_rows(chunk: _Chunk, group: _Group, i: int, data: np.ndarray, *, write: bool) -> None:
    """The rows of `group` in its chunk i, between `chunk` and `data` (request order): into the
    chunk (write, which makes it dirty) or out of it."""
    lo, hi = group.bounds[i], group.bounds[i + 1]
    sel = slice(lo, hi) if group.order is None else group.order[lo:hi]
    if write:
        chunk.data[group.offset[lo:hi]] = data[sel]
        chunk.dirty = True
    else:
        data[sel] = chunk.data[group.offset[lo:hi]]


class CachedPartitions:
    """Owned partitions of one table, served through a bounded LRU chunk cache with write-back.

    Same contract as resident partitions (a numpy oracle holding the whole table): `read_rows`
    returns what was last written, `write_rows` is visible to every later read, and after
    `flush()` the Zarr store holds exactly what the oracle holds.
    """

    def __init__(self, store: TableStore, partitions: Iterable[int], budget_bytes: int, *,
                 io: ChunkIO | Engine | None = None) -> None:
        """Cache the given partitions of `store` in at most `budget_bytes` of chunk data.

        Args:
            store: the table's durable home; must be open "r+" for writes to be accepted.
            partitions: partition ids owned here (the cache refuses rows of any other).
            budget_bytes: most bytes of chunk data held at once; at least one chunk of the largest
                array (a request touching more chunks than fit is served in several batches).
            io: the chunk I/O: a `ChunkIO` over `store` (the caller keeps it and closes it), or an
                engine name (None: raw in place for raw arrays, TensorStore for compressed ones;
                this cache then owns it and `close()` releases it).

        Raises: LayoutError for a bad partition id or a budget smaller than one chunk.
        """
        self.store = store
        self.spec = store.spec
        owned = sorted({check_partition(self.spec, p) for p in partitions})
        self.partitions: tuple[int, ...] = tuple(owned)
        self._owned = np.zeros(self.spec.num_partitions, dtype=bool)
        self._owned[owned] = True
        self._names: tuple[str, ...] = store.array_names
        self._chunk_rows = {name: store.chunk_shape(name)[1] for name in self._names}
        # [0, *trailing] arrays of each logical dtype: shape and dtype templates for checks and outputs
        layouts = table_arrays(self.spec)
        self._templates = {n: np.empty((0, *layouts[n].trailing), layouts[n].dtype) for n in self._names}
        self._row_bytes = {n: math.prod(t.shape[1:]) * t.dtype.itemsize for n, t in self._templates.items()}
        largest = max(self._chunk_rows[n] * self._row_bytes[n] for n in self._names)
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
            raise LayoutError(f"budget_bytes must be an int, got {budget_bytes!r}")
        if budget_bytes < largest:
            raise LayoutError(
                f"table {self.spec.name}: cache budget {budget_bytes} B is smaller than one chunk "
                f"({largest} B); give at least one chunk of the largest array"
            )
        self.budget_bytes = int(budget_bytes)
        if isinstance(io, ChunkIO) and io.store is not store:
            raise LayoutError(f"table {self.spec.name}: the chunk I/O serves {io.store.path}, not {store.path}")
        self._owns_io = not isinstance(io, ChunkIO)
        self.io = io if isinstance(io, ChunkIO) else open_chunk_io(store, io)
        # chunks per partition of each array: chunk c of partition p has key (name, p * n + c)
        R = self.spec.rows_per_partition
        self._chunks_per_partition = {n: -(-R // self._chunk_rows[n]) for n in self._names}
        # update_rows(update_at=) steps rows inside the held chunks, a stretch of the finest chunk's
        # rows at a time: every array's chunk rows must be a multiple of it (or the whole partition)
        # and one chunk of every array must fit the budget
        finest = min(self._chunk_rows.values())
        aligned = all(r % finest == 0 or r == R for r in self._chunk_rows.values())
        chunk_set = sum(self._chunk_rows[n] * self._row_bytes[n] for n in self._names)
        self._stretch_rows: int | None = finest if aligned and chunk_set <= self.budget_bytes else None
        self._valid_rows = [self.spec.valid_rows(p) for p in range(self.spec.num_partitions)]
        self.in_place_read_share = IN_PLACE_READ_SHARE
        self._chunks: OrderedDict[tuple[str, int], _Chunk] = OrderedDict()  # LRU first
        self._lock = threading.RLock()
        self._bytes = 0
        self._counters = dict.fromkeys(
            ("hits", "misses", "evictions", "writebacks", "rows_read", "rows_written", "rows_read_in_place",
             "rows_written_in_place", "bytes_loaded", "bytes_written_back"), 0,
        )

    @property
    def templates(self) -> dict[str, np.ndarray]:
        """Per array an empty [0, *trailing] array of its logical dtype (shape and dtype of a row)."""
        return dict(self._templates)

    def __repr__(self) -> str:
        return (f"CachedPartitions({self.spec.name!r}, {len(self.partitions)} partitions, "
                f"budget={self.budget_bytes} B)")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- public API --------------------------------------------------------------------------

    def read_rows(self, rows: np.ndarray, names: Sequence[str] | None = None, *,
                  load: bool = True) -> dict[str, np.ndarray]:
        """Rows of the table: rows int [N] global (may repeat, any order) -> {name: [N, ...]}.

        names limits which arrays are read (default: all, "values" first). Returns fresh arrays in
        the logical dtypes (bfloat16 values as ml_dtypes.bfloat16). load=False (rows the row cache
        admits): rows whose chunk is not held are read from their chunk files where the chunk I/O
        reads that array in place (raw arrays), without loading the chunk, unless they are more
        than `in_place_read_share` of its rows (`IN_PLACE_READ_SHARE`; then the chunk is loaded).
        Raises: LayoutError (nothing read) for a row out of [0, P) or in a partition not cached here.
        """
        names = self.check_names(names)
        part, local = self.check_rows(rows)
        with self._lock:
            out = {}
            groups = self._groups(names, part, local)
            for name in names:
                template = self._templates[name]
                buf = np.empty((len(part), *template.shape[1:]), dtype=template.dtype)
                if load or not self.io.writes_in_place(name):
                    self._visit(name, groups[name], buf, write=False)
                else:
                    self._in_place(name, groups[name], buf, part, local, write=False)
                out[name] = buf
            self._counters["rows_read"] += len(part)
            return out

    def write_rows(self, rows: np.ndarray, arrays: Mapping[str, np.ndarray], *, load: bool = True) -> None:
        """Overwrite rows: rows int [N] global and unique, arrays {name: [N, ...]} in exact dtypes.

        Any subset of the table's arrays may be given. The chunks touched become dirty; they reach
        the store on eviction or `flush()`. load=False (rows evicted from the row cache above):
        rows whose chunk is not held are written straight into their chunk files in place, where
        the chunk I/O writes that array in place (`ChunkIO.writes_in_place`: raw arrays), instead
        of loading the whole chunk to change a few rows of it and writing it back later; a chunk
        that is not held already has its latest bytes on disk (dirty chunks are written back
        before they are dropped), so the file then holds exactly the rows written.
        Raises (nothing written): LayoutError for duplicate, out-of-range or foreign rows, an unknown
        name, a wrong dtype or shape; ReadOnlyTableError when the store is open read-only.
        """
        if self.store.read_only:
            raise ReadOnlyTableError(f"table {self.spec.name} at {self.store.path} is open read-only")
        part, local = self.check_rows(rows)
        if len(np.unique(part * self.spec.rows_per_partition + local)) != len(part):
            raise LayoutError(f"table {self.spec.name}: write_rows got duplicate rows")
        checked = self.check_arrays(arrays, len(part))
        with self._lock:
            groups = self._groups([name for name, _ in checked], part, local)
            for name, data in checked:
                if load or not self.io.writes_in_place(name):
                    self._visit(name, groups[name], data, write=True)
                else:
                    self._in_place(name, groups[name], data, part, local, write=True)
            self._counters["rows_written"] += len(part)

    def _in_place(self, name: str, group: _Group, data: np.ndarray, part: np.ndarray,
                  local: np.ndarray, *, write: bool) -> None:
        """Gather or scatter (`write`) rows: from or into the held chunks (those become dirty on a
        write), and from or into the chunk files, in place, for the chunks that are not held."""
        missing = self._serve_held(name, group, data, write=write)
        if not missing:
            return
        out = np.zeros(len(group.codes), dtype=bool)  # chunk i is not held
        out[missing] = True
        sizes = np.diff(np.asarray(group.bounds))
        if not write:  # a read of many rows of a chunk loads it: one read beats a read per row
            dense = np.flatnonzero(out & (sizes > self._chunk_rows[name] * self.in_place_read_share))
            if dense.size:
                out[dense] = False
                self._counters["misses"] += dense.size
                self._load_and_copy(name, group, dense.tolist(), data, write=False)
                if not out.any():
                    return
        sorted_pos = np.flatnonzero(np.repeat(out, sizes))  # sorted positions of the rows of chunks not held
        pos = sorted_pos if group.order is None else group.order[sorted_pos]
        if write:
            self.io.write_rows(name, part[pos], local[pos], data[pos])
            self._counters["rows_written_in_place"] += len(pos)
        else:
            R = self.spec.rows_per_partition
            u, inv = np.unique(part[pos] * R + local[pos], return_inverse=True)  # a read may repeat rows
            data[pos] = self.io.read_rows(name, u // R, u % R)[inv.reshape(-1)]
            self._counters["rows_read_in_place"] += len(u)

    def update_rows(self, rows: np.ndarray, update: RowUpdate, *, update_at: RowUpdateAt | None = None) -> None:
        """Read-modify-write unique rows in one pass over their chunks (the cached optimizer step).

        rows int [N] global and unique. The rows are taken in (partition, local row) order, in
        batches whose chunks of *every* array fit the budget together; for each batch,
        `update(block, positions)` gets block = {name: [k, ...]} (fresh arrays of all arrays, in the
        logical dtypes) and positions = int64 [k] indices into `rows`, changes block in place, and
        the block is scattered back (its chunks become dirty). So a chunk is loaded once and
        written back once per call, where a read followed by a write would load it twice when the
        budget is smaller than the rows' chunks. A budget below one chunk of every array together
        falls back to that read-then-write.

        update_at, when given, changes the rows where they are held instead of in a copied block
        (as `HotRowCache.update_rows` does for its slots): `update_at(arrays, index, positions)`
        gets, per stretch of rows that one chunk of every array covers, {name: view of those rows
        inside the held chunks}, index int64 [k] (rows in the views) and positions int64 [k] into
        `rows`, and changes arrays[name][index] in place; rows of sparse stretches whose chunks are
        not all held come as one block read from the chunk files (then written back in place). It is
        used when every array's chunks are a whole multiple of the smallest chunks' rows (the
        planner's work tables: the `step` array's chunk spans whole value chunks) and one chunk of
        every array fits the budget; otherwise `update` runs on blocks as above.
        Raises (nothing changed): LayoutError for duplicate, out-of-range or foreign rows;
        ReadOnlyTableError when the store is open read-only.
        """
        if self.store.read_only:
            raise ReadOnlyTableError(f"table {self.spec.name} at {self.store.path} is open read-only")
        part, local = self.check_rows(rows)
        key = part * self.spec.rows_per_partition + local
        order = np.argsort(key, kind="stable")
        if len(order) > 1 and not (np.diff(key[order]) > 0).all():
            raise LayoutError(f"table {self.spec.name}: update_rows got duplicate rows")
        if len(order) == 0:
            return
        part, local = part[order], local[order]
        if update_at is not None and self._stretch_rows is not None:
            with self._lock:
                self._update_in_chunks(part, local, order, update_at)
                self._counters["rows_read"] += len(order)
                self._counters["rows_written"] += len(order)
            return
        with self._lock:
            for lo, hi in self._batches(part, local):
                sel = slice(lo, hi)
                groups = self._groups(self._names, part[sel], local[sel])  # rows sorted: no sort
                self._make_room(self._missing_bytes(groups))  # one write-back batch, not one per array
                block = {}
                for name in self._names:
                    t = self._templates[name]
                    block[name] = np.empty((hi - lo, *t.shape[1:]), dtype=t.dtype)
                    self._visit(name, groups[name], block[name], write=False)
                update(block, order[sel])
                for name in self._names:
                    self._visit(name, groups[name], block[name], write=True)
            self._counters["rows_read"] += len(order)
            self._counters["rows_written"] += len(order)

    def _update_in_chunks(self, part: np.ndarray, local: np.ndarray, order: np.ndarray,
                          update_at: RowUpdateAt) -> None:
        """update_rows(update_at=) on rows sorted by (partition, local): one `update_at` call per
        stretch of `_stretch_rows` rows (one chunk of the finest array, a slice of the others').

        Stretches go in batches: as many consecutive stretches as their chunks (of every array,
        held or not) fit the budget together; a batch's held chunks become most recently used, and
        only its missing chunks are read, one read call per array, after one round of evictions.
        A stretch with at most `in_place_read_share` of its rows and not all of its chunks held
        is not loaded: all such rows are read (from the held chunks, else from the chunk files),
        stepped in one `update_at` call (arrays then are those rows, index arange) and written
        back the same way (raw arrays only)."""
        base = self._stretch_rows
        assert base is not None
        per_partition = -(-self.spec.rows_per_partition // base)
        code = part * per_partition + local // base
        starts = np.flatnonzero(code[1:] != code[:-1]) + 1
        bounds = [0, *starts.tolist(), len(code)]
        chunks, names = self._chunks, self._names
        stretches = []  # (lo, hi, first local row, {name: chunk key})
        sparse = []  # rows of stretches with few rows and no chunk held: stepped in place, row by row
        in_place = all(self.io.writes_in_place(n) for n in names)
        for i in range(len(bounds) - 1):
            p, k = divmod(int(code[bounds[i]]), per_partition)
            first = k * base  # the stretch is local rows [first, first + base) of partition p
            keys = {n: (n, p * self._chunks_per_partition[n] + first // self._chunk_rows[n]) for n in names}
            lo, hi = bounds[i], bounds[i + 1]
            if in_place and hi - lo <= base * self.in_place_read_share and not all(k in chunks for k in keys.values()):
                sparse.append(np.arange(lo, hi))
            else:
                stretches.append((lo, hi, first, keys))
        if sparse:  # first: the chunks loaded below then read what these rows wrote
            sel = np.concatenate(sparse)
            p_sel, l_sel = part[sel], local[sel]
            groups = self._groups(names, p_sel, l_sel)  # sorted rows: no sort
            block = {}
            for n in names:  # rows of held chunks from RAM, the others from the chunk files
                t = self._templates[n]
                block[n] = np.empty((len(sel), *t.shape[1:]), dtype=t.dtype)
                self._in_place(n, groups[n], block[n], p_sel, l_sel, write=False)
            update_at(block, np.arange(len(sel)), order[sel])
            for n in names:
                self._in_place(n, groups[n], block[n], p_sel, l_sel, write=True)
        nbytes = {n: self._chunk_rows[n] * self._row_bytes[n] for n in names}
        i = 0
        while i < len(stretches):
            batch: dict[tuple[str, int], int] = {}  # every chunk the batch needs -> its bytes
            need, j = 0, i
            while j < len(stretches):
                new = {key: nbytes[n] for n, key in stretches[j][3].items() if key not in batch}
                if j > i and need + sum(new.values()) > self.budget_bytes:
                    break
                batch.update(new)
                need += sum(new.values())
                j += 1
            missing: dict[str, list[int]] = {}
            for name, c in batch:
                if (name, c) in chunks:
                    chunks.move_to_end((name, c))  # held: most recently used, so making room never evicts it
                else:
                    missing.setdefault(name, []).append(c)
            n_missing = sum(len(v) for v in missing.values())
            self._counters["hits"] += len(batch) - n_missing
            self._counters["misses"] += n_missing
            if missing:
                self._make_room(sum(nbytes[n] * len(c) for n, c in missing.items()))  # one write-back batch
                for name, codes in missing.items():
                    self._load(name, codes)  # one read call per array
            for lo, hi, first, keys in stretches[i:j]:
                arrays = {}
                for name, key in keys.items():
                    chunk = chunks[key]
                    chunk.dirty = True
                    off = first % self._chunk_rows[name]
                    arrays[name] = chunk.data[off:off + base]
                update_at(arrays, local[lo:hi] - first, order[lo:hi])
            i = j

    def _missing_bytes(self, groups: Mapping[str, _Group]) -> int:
        """Bytes of the chunks (of every array) that the grouped rows need and are not held; the
        held ones become most recently used, so making room never evicts them."""
        total = 0
        for name, group in groups.items():
            missing = 0
            for c in group.codes:
                if (name, c) in self._chunks:
                    self._chunks.move_to_end((name, c))
                else:
                    missing += 1
            total += missing * self._chunk_rows[name] * self._row_bytes[name]
        return total

    def _batches(self, part: np.ndarray, local: np.ndarray) -> list[tuple[int, int]]:
        """[lo, hi) spans of rows sorted by (partition, local) whose chunks of all arrays fit the budget.

        A span's cost is every array's chunk of its first row plus each chunk that starts later in
        it. One span (the whole request) when even one chunk of every array does not fit: the
        caller then reads all, updates, writes all (the chunk cache thrashes but stays correct).
        """
        n = len(part)
        new_bytes = np.zeros(n, dtype=np.int64)  # bytes of the chunks that row i is the first of
        full = 0  # bytes of one chunk of every array
        for name in self._names:
            rows = self._chunk_rows[name]
            nbytes = rows * self._row_bytes[name]
            code = part * self._chunks_per_partition[name] + local // rows
            first = np.ones(n, dtype=bool)
            first[1:] = code[1:] != code[:-1]
            new_bytes += first * nbytes
            full += nbytes
        if full > self.budget_bytes:
            return [(0, n)]
        cum = np.cumsum(new_bytes)
        spans, lo = [], 0
        while lo < n:  # greedy: extend while the chunks started after lo still fit next to lo's
            hi = int(np.searchsorted(cum, cum[lo] + self.budget_bytes - full, side="right"))
            hi = max(hi, lo + 1)
            spans.append((lo, hi))
            lo = hi
        return spans

    def flush(self) -> None:
        """Write every dirty chunk back to the store (whole chunks); they stay cached, now clean."""
        with self._lock:
            dirty = [(key, chunk) for key, chunk in self._chunks.items() if chunk.dirty]
            self._write_back(dirty)
            if dirty:
                logger.debug("table %s: flushed %d dirty chunks", self.spec.name, len(dirty))

    def close(self) -> None:
        """Flush, then release the chunk I/O's open files if this cache opened it (idempotent)."""
        with self._lock:
            if not self.store.read_only:
                self.flush()
            if self._owns_io:
                self.io.close()

    def copy_to(self, target: TableStore) -> None:
        """Flush, then copy the owned partitions into `target` (same spec), a block at a time.

        For checkpoints: `target` is a table group created with `initialize=False` (its own chunks
        and codecs; zstd state by default); only this cache's partitions are written there (each by
        its single owner). Blocks are whole chunks of both tables (the larger chunk), read through
        this cache's chunk I/O and written with zarr-python, so a small source chunk never makes
        the target re-encode one of its chunks several times. Bypasses the cache, so it neither
        evicts hot chunks nor holds more than one block of extra memory.
        Raises: LayoutError if target's spec differs; ReadOnlyTableError if target is read-only.
        """
        if target.spec != self.spec:
            raise LayoutError(f"copy_to: target spec {target.spec} differs from {self.spec}")
        if target.read_only:
            raise ReadOnlyTableError(f"table {target.spec.name} at {target.path} is open read-only")
        with self._lock:
            self.flush()
            for p in self.partitions:
                valid = self.spec.valid_rows(p)
                for name in self._names:
                    step = max(self._chunk_rows[name], target.chunk_shape(name)[1])
                    for start in range(0, valid, step):
                        stop = min(start + step, valid)
                        (block,) = self.io.read(name, [(p, start, stop)])
                        target.write_rows(p, np.arange(start, stop), {name: block})

    def metrics(self) -> dict[str, float]:
        """Counters: cache_bytes (chunk data held), budget_bytes, chunks, dirty_chunks, hits, misses
        (one per (array, chunk) a request touches), hit_rate, evictions, writebacks, rows_read,
        rows_written, rows_read_in_place / rows_written_in_place (`read_rows` / `write_rows` with
        load=False, from or into chunk files: one per row and array), bytes_loaded,
        bytes_written_back, and the chunk I/O's io_read_s, io_write_s (seconds spent in the store),
        io_read_bytes, io_write_bytes (whole chunks and single rows), io_read_ops, io_write_ops,
        io_open_files, the engines: io_<engine>_arrays (arrays each
        engine serves) and io_engine.<array>.<engine> = 1."""
        with self._lock:
            c = dict(self._counters)
            accesses = c["hits"] + c["misses"]
            io = self.io.counters
            engines = self.io.engines
            return {
                "io_read_s": io["read_s"], "io_write_s": io["write_s"],
                "io_read_bytes": io["read_bytes"], "io_write_bytes": io["write_bytes"],
                "io_read_ops": io["read_ops"], "io_write_ops": io["write_ops"],
                "io_open_files": self.io.open_files(),
                **{f"io_{e}_arrays": sum(1 for v in engines.values() if v == e) for e in ENGINES},
                **{f"io_engine.{n}.{e}": 1 for n, e in engines.items()},
                "cache_bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "chunks": len(self._chunks),
                "dirty_chunks": sum(1 for ch in self._chunks.values() if ch.dirty),
                **c,
                "hit_rate": c["hits"] / accesses if accesses else 0.0,
            }

    # --- the request path ----------------------------------------------------------------------

    def _groups(self, names: Sequence[str], part: np.ndarray, local: np.ndarray) -> dict[str, _Group]:
        """`_group` of each array; arrays on the same chunk grid share one."""
        by_rows: dict[int, _Group] = {}
        for name in names:
            if self._chunk_rows[name] not in by_rows:
                by_rows[self._chunk_rows[name]] = self._group(name, part, local)
        return {name: by_rows[self._chunk_rows[name]] for name in names}

    def _group(self, name: str, part: np.ndarray, local: np.ndarray) -> _Group:
        """Request positions grouped by the chunk of `name` they fall in, chunks in ascending order.

        Rows that arrive in (partition, local) order (update_rows, the row cache's misses) are
        grouped without a sort: each chunk is then a contiguous span of the request."""
        chunk_rows = self._chunk_rows[name]
        within = local // chunk_rows
        codes = part * self._chunks_per_partition[name] + within  # one int per (partition, chunk)
        offset = local - within * chunk_rows  # row inside its chunk
        order = None
        if len(codes) > 1 and (codes[1:] < codes[:-1]).any():
            order = np.argsort(codes, kind="stable")
            codes, offset = codes[order], offset[order]
        starts = np.flatnonzero(codes[1:] != codes[:-1]) + 1
        bounds = [0, *starts.tolist(), len(codes)]
        return _Group(codes[bounds[:-1]].tolist() if len(codes) else [], bounds, order, offset)

    def _visit(self, name: str, group: _Group, data: np.ndarray, *, write: bool) -> None:
        """Gather (write=False: data[i] = row i) or scatter (write=True: row i = data[i]), chunk by chunk."""
        missing = self._serve_held(name, group, data, write=write)
        self._counters["misses"] += len(missing)
        self._load_and_copy(name, group, missing, data, write=write)

    def _serve_held(self, name: str, group: _Group, data: np.ndarray, *, write: bool) -> list[int]:
        """Copy the rows of the held chunks of `group` (they become most recently used) and return
        the indices of its chunks that are not held. Hits are served first: loading a miss may
        evict, and must never evict a chunk still to be served."""
        missing = []
        chunks = self._chunks
        for i, code in enumerate(group.codes):
            chunk = chunks.get((name, code))
            if chunk is None:
                missing.append(i)
                continue
            chunks.move_to_end((name, code))
            _copy_rows(chunk, group, i, data, write=write)
        self._counters["hits"] += len(group.codes) - len(missing)
        return missing

    def _load_and_copy(self, name: str, group: _Group, indices: list[int], data: np.ndarray, *,
                       write: bool) -> None:
        """Load the chunks group.codes[i], i in `indices`, as many per read call as the budget holds,
        and copy each one's rows."""
        per_batch = max(1, self.budget_bytes // (self._chunk_rows[name] * self._row_bytes[name]))
        for b in range(0, len(indices), per_batch):
            batch = indices[b:b + per_batch]
            for i, chunk in zip(batch, self._load(name, [group.codes[i] for i in batch]), strict=True):
                _copy_rows(chunk, group, i, data, write=write)

    def _load(self, name: str, codes: list[int]) -> list[_Chunk]:
        """Read whole chunks of one array from the store in one batch and insert them, evicting to fit."""
        spans, sizes = [], []
        for code in codes:
            p, c = divmod(code, self._chunks_per_partition[name])
            start, stop = self._chunk_span(name, p, c)
            spans.append((p, start, min(stop, self._valid_rows[p])))  # never the padding row
            sizes.append((stop - start) * self._row_bytes[name])
        self._make_room(sum(sizes))
        loaded = []
        for code, (_, start, valid_stop), nbytes, read in zip(codes, spans, sizes, self.io.read(name, spans),
                                                              strict=True):
            rows = nbytes // self._row_bytes[name]
            if valid_stop - start < rows:  # the padding row is never served; keep it 0 as on disk
                data = np.zeros((rows, *read.shape[1:]), dtype=read.dtype)
                data[: len(read)] = read
            else:
                data = read
            chunk = _Chunk(np.ascontiguousarray(data))
            self._chunks[(name, code)] = chunk
            loaded.append(chunk)
            self._bytes += nbytes
            self._counters["bytes_loaded"] += nbytes
        assert self._bytes <= self.budget_bytes, (self._bytes, self.budget_bytes)
        return loaded

    def _make_room(self, nbytes: int) -> None:
        """Evict least recently used chunks until nbytes more fit; the dirty ones are written back first."""
        victims = []
        freed = 0
        for key, chunk in self._chunks.items():
            if self._bytes - freed + nbytes <= self.budget_bytes:
                break
            victims.append((key, chunk))
            freed += chunk.data.nbytes
        self._write_back([(k, c) for k, c in victims if c.dirty])  # before dropping: a failed write loses nothing
        for key, chunk in victims:
            del self._chunks[key]
            self._bytes -= chunk.data.nbytes
            self._counters["evictions"] += 1

    def _write_back(self, chunks: list[tuple[tuple[str, int], _Chunk]]) -> None:
        """Write dirty chunks back whole (never the padding row), in one batch; they become clean."""
        items = []
        for (name, code), chunk in chunks:
            p, c = divmod(code, self._chunks_per_partition[name])
            start, _ = self._chunk_span(name, p, c)
            n = min(len(chunk.data), self._valid_rows[p] - start)
            items.append((name, p, start, chunk.data[:n]))
        self.io.write(items)
        for (_, chunk), (name, _, _, data) in zip(chunks, items, strict=True):
            chunk.dirty = False
            self._counters["writebacks"] += 1
            self._counters["bytes_written_back"] += len(data) * self._row_bytes[name]

    def _chunk_span(self, name: str, p: int, c: int) -> tuple[int, int]:
        """Local rows [start, stop) of chunk c of partition p (the last chunk may be shorter)."""
        start = c * self._chunk_rows[name]
        return start, min(start + self._chunk_rows[name], self.spec.rows_per_partition)

    # --- validation (no state touched) ---------------------------------------------------------

    def check_names(self, names: Sequence[str] | None) -> tuple[str, ...]:
        if names is None:
            return self._names
        if isinstance(names, str):
            raise LayoutError(f"names must be a sequence of array names, got the string {names!r}")
        for n in names:
            if n not in self._names:
                raise LayoutError(f"table {self.spec.name}: unknown array {n!r}; arrays: {self._names}")
        return tuple(names)

    def check_rows(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """Global rows int [N] -> (partition int64 [N], local row int64 [N]); LayoutError if out of
        [0, P) or in a partition not cached here. Touches no state."""
        r = np.asarray(rows)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise LayoutError(f"rows must be a 1-D integer array, got {r.dtype} {r.shape}")
        r = r.astype(np.int64, copy=False)
        if r.size and (r.min() < 0 or r.max() >= self.spec.rows):
            raise LayoutError(f"table {self.spec.name}: rows must be in [0, {self.spec.rows})")
        local, part = np.divmod(r, self.spec.num_partitions)
        if r.size and not self._owned[part].all():
            foreign = sorted(set(part[~self._owned[part]].tolist()))[:8]
            raise LayoutError(f"table {self.spec.name}: partitions {foreign} are not cached here")
        return part, local

    def check_arrays(self, arrays: Mapping[str, np.ndarray], n: int) -> list[tuple[str, np.ndarray]]:
        if not isinstance(arrays, Mapping) or not arrays:
            raise LayoutError(f"table {self.spec.name}: expected a non-empty dict of arrays")
        checked = []
        for name, data in arrays.items():
            template = self._templates[self.check_names([name])[0]]
            expected = (n, *template.shape[1:])
            if not isinstance(data, np.ndarray) or data.dtype != template.dtype or data.shape != expected:
                got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise LayoutError(
                    f"table {self.spec.name}: array {name!r} must be {template.dtype} {expected}, got {got}"
                )
            checked.append((name, data))
        return checked
