"""Where a shard keeps the partitions it owns: in RAM, or through a chunk cache over Zarr (DESIGN §4.1, §5).

`TablePartitions` is the small interface `Shard` calls for one table: read value rows, apply one
optimizer step to unique rows, add / remove / export whole partitions (rescaling hands partitions
over), write them into a checkpoint, report bytes and counters. Rows are always *global* rows
(row r lives in partition r % NP at local row r // NP); callers have checked range and ownership.

- `ResidentPartitions`: one flat array [slots * R, d_v] plus state arrays of the same leading size;
  partition p sits at slot `slot_of[p]`, so global row r is at `slot_of[r % NP] * R + r // NP`.
  Added partitions take a free slot (capacity grows by a quarter when none is left), removed ones
  free theirs, so a rescale never rebuilds the whole table.
- `CachedTablePartitions`: at most `budget_bytes` in RAM over a writable table store, in two levels:
  a row-granular `storage.row_cache.HotRowCache` (hot rows with their optimizer state, admitted by
  access frequency; `row_share` of the budget) over a `storage.chunk_cache.CachedPartitions` of whole
  chunks (the rest, at least one chunk of every array together; chunk I/O in place for raw arrays,
  TensorStore for compressed ones, storage/chunk_io.py, one engine per table, released by `close()`). An optimizer step
  updates cached rows in place and the others in one read-modify-write pass over their chunks
  (`HotRowCache.update_rows`). `work_table_options` (`chunk_bytes_for_budget`, all arrays raw) is
  how a planner creates a table that will not fit its shards' budgets (orchestration/distributed.py).
- `TieredPartitions`: what a shard with a RAM budget holds: the partitions that fit are resident,
  the rest go through the cache (`plan_tiers` decides). Both sub-stores obey the same contract, so
  a shard gives identical answers whichever tier a partition is in (tests/param_server/test_cached_shard.py).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from param_server.errors import ConfigError
from param_server.optimizers import SparseOptimizer
from storage.chunk_cache import CachedPartitions
from storage.chunk_io import ChunkIO, Engine, open_chunk_io
from storage.layout import (
    DEFAULT_TARGET_CHUNK_BYTES,
    VALUES,
    ArrayLayout,
    TableSpec,
    init_partition_values,
    numpy_dtype,
    state_layout,
    table_arrays,
)
from storage.row_cache import HotRowCache
from storage.table_store import TableStore

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]  # {"values": [R, d_v], state name: [R, ...]} of one partition


def partition_of_valid(rows: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition of each validated row (int64, >= 0): rows % NP, as a mask where NP is a power of two
    (~5x cheaper than an int64 remainder; the hot paths of every call take it)."""
    if num_partitions & (num_partitions - 1) == 0:
        return rows & (num_partitions - 1)
    return rows % num_partitions


def local_row_of_valid(rows: np.ndarray, num_partitions: int) -> np.ndarray:
    """Local row of each validated row (int64, >= 0) in its partition: rows // NP, a shift where NP
    is a power of two."""
    if num_partitions & (num_partitions - 1) == 0:
        return rows >> (int(num_partitions).bit_length() - 1)
    return rows // num_partitions


def partition_nbytes(spec: TableSpec) -> int:
    """Bytes of one partition in RAM: values and optimizer state, padding rows included."""
    r = spec.rows_per_partition
    total = r * spec.dim * numpy_dtype(spec.dtype).itemsize
    for trailing, dt in state_layout(spec).values():
        total += r * math.prod(trailing) * np.dtype(dt).itemsize
    return total


def initial_arrays(spec: TableSpec, p: int) -> Arrays:
    """Partition p as a fresh table holds it: initial values (seeded by (seed, p)), state at 0."""
    r = spec.rows_per_partition
    out = {VALUES: init_partition_values(spec, p)}
    for name, (trailing, dt) in state_layout(spec).items():
        out[name] = np.zeros((r, *trailing), dtype=dt)
    return out


def zero_state(store: TableStore, p: int) -> None:
    """Write 0 into every optimizer state array of partition p (a re-initialised partition)."""
    r = store.spec.rows_per_partition
    arrays = {name: np.zeros((r, *trailing), dtype=dt) for name, (trailing, dt) in state_layout(store.spec).items()}
    if arrays:
        store.write_partition(p, arrays)


def copy_partition(source: TableStore, target: TableStore, p: int, block_bytes: int = 8 << 20) -> None:
    """Copy partition p (all arrays) from one table group to another, ~`block_bytes` at a time."""
    valid = source.spec.valid_rows(p)
    for name, layout in table_arrays(source.spec).items():
        row_bytes = max(1, math.prod(layout.trailing) * layout.dtype.itemsize)
        step = max(1, block_bytes // row_bytes)
        for start in range(0, valid, step):
            rows = np.arange(start, min(start + step, valid))
            target.write_rows(p, rows, source.read_rows(p, rows, names=[name]))


@dataclass(frozen=True)
class TierPlan:
    """Which owned partitions stay resident and how many bytes the chunk cache of the rest may hold."""

    resident: tuple[int, ...]
    cached: tuple[int, ...]
    cache_bytes: int  # 0 when nothing is cached
    used_bytes: int  # resident bytes + cache_bytes: what this table takes of the shard's budget


def _chunk_bytes(store: TableStore) -> list[int]:
    """Bytes of one chunk of each array of `store`."""
    layouts = table_arrays(store.spec)
    return [_bytes_of_rows(layouts[n], store.chunk_shape(n)[1]) for n in store.array_names]


def _bytes_of_rows(layout: ArrayLayout, rows: int) -> int:
    return rows * math.prod(layout.trailing) * layout.storage_dtype.itemsize


def min_cache_bytes(store: TableStore) -> int:
    """The smallest cache budget over `store`: one chunk of its largest array (CachedPartitions' rule)."""
    return max(_chunk_bytes(store))


def chunk_set_bytes(store: TableStore) -> int:
    """One chunk of every array together: the chunk budget below which an update pass thrashes."""
    return sum(_chunk_bytes(store))


def plan_tiers(spec: TableSpec, partitions: Iterable[int], budget_bytes: int | None, *,
               min_cache: int, cache_share: float) -> TierPlan:
    """Split `partitions` between RAM and the chunk cache within `budget_bytes` (None = no budget).

    Everything resident when it fits. Otherwise `cache_share` of the budget (at least `min_cache`)
    is the cache and as many partitions as fit in the rest stay resident.
    Raises: ConfigError when the budget cannot hold even one chunk.
    """
    owned = tuple(sorted(int(p) for p in partitions))
    each = partition_nbytes(spec)
    if budget_bytes is None or each * len(owned) <= budget_bytes:
        return TierPlan(owned, (), 0, each * len(owned))
    if budget_bytes < min_cache:
        raise ConfigError(f"table {spec.name}: RAM budget {budget_bytes} B is below one cache chunk "
                          f"({min_cache} B)")
    cache = min(budget_bytes, max(min_cache, int(budget_bytes * cache_share)))
    n_resident = min(len(owned), (budget_bytes - cache) // each)
    resident = owned[:n_resident]
    return TierPlan(resident, owned[n_resident:], cache, cache + each * n_resident)


class TablePartitions(ABC):
    """The owned partitions of one table (the interface `Shard` uses; see the module docstring)."""

    spec: TableSpec

    @property
    @abstractmethod
    def partitions(self) -> tuple[int, ...]:
        """Owned partitions, ascending."""

    @abstractmethod
    def read(self, rows: np.ndarray) -> np.ndarray:
        """Values of global rows int64 [n] (owned, may repeat) -> [n, d_v] in the table dtype."""

    @abstractmethod
    def step(self, optimizer: SparseOptimizer, rows: np.ndarray, grads: np.ndarray, lr: float) -> None:
        """One optimizer step on unique global rows int64 [U] with grads float32 [U, d_v]."""

    @abstractmethod
    def add(self, p: int, arrays: Arrays) -> None:
        """Hold partition p: {"values": [R, d_v], state: [R, ...]} in exact dtypes (state may be missing: 0)."""

    @abstractmethod
    def remove(self, p: int) -> None:
        """Stop holding partition p (its data must have been exported first)."""

    @abstractmethod
    def export(self, p: int) -> Arrays:
        """Copies of partition p's arrays, padding rows included."""

    @abstractmethod
    def save(self, target: TableStore) -> None:
        """Write every owned partition into `target` (a table group of the same spec)."""

    def flush(self) -> None:  # noqa: B027 - optional hook: RAM-only stores have nothing to write back
        """Make the durable home hold what RAM holds (no-op when there is none)."""

    def close(self) -> None:
        """Flush, and release what the store holds open (files of a chunk cache); safe to call twice."""
        self.flush()

    @abstractmethod
    def resident_bytes(self) -> int:
        """Bytes of partition data held in RAM (chunk data for a cache)."""

    def metrics(self) -> dict[str, float]:
        """Counters of this store (cache hits, evictions, ...); empty for RAM."""
        return {}


class ResidentPartitions(TablePartitions):
    """Owned partitions in RAM as flat arrays with a slot per partition (see the module docstring)."""

    def __init__(self, spec: TableSpec, partitions: Mapping[int, Arrays] | None = None, *, slots: int = 0) -> None:
        """`slots`: room for this many partitions up front (add them one by one without regrowing)."""
        self.spec = spec
        self._r = spec.rows_per_partition
        self._state_layout = state_layout(spec)
        self.slot_of = np.full(spec.num_partitions, -1, dtype=np.int64)  # -1: not held here
        self._free: list[int] = []
        self.values = np.empty((0, spec.dim), dtype=numpy_dtype(spec.dtype))
        self.state = {n: np.zeros((0, *t), dtype=dt) for n, (t, dt) in self._state_layout.items()}
        items = dict(partitions or {})
        self._grow(max(len(items), slots))
        for p in sorted(items):
            self.add(p, items[p])

    @property
    def partitions(self) -> tuple[int, ...]:
        return tuple(np.flatnonzero(self.slot_of >= 0).tolist())

    def _flat(self, rows: np.ndarray) -> np.ndarray:
        np_ = self.spec.num_partitions
        return self.slot_of[partition_of_valid(rows, np_)] * self._r + local_row_of_valid(rows, np_)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.values[self._flat(rows)]  # fancy indexing: ~2x np.take(axis=0) on wide rows (measured)

    def step(self, optimizer: SparseOptimizer, rows: np.ndarray, grads: np.ndarray, lr: float) -> None:
        optimizer.step(self.values, self.state, self._flat(rows), grads, lr)

    def _grow(self, slots: int) -> None:
        if slots <= 0:
            return
        old = self.values.shape[0] // self._r
        extra = slots * self._r
        self.values = np.concatenate([self.values, np.zeros((extra, self.spec.dim), self.values.dtype)])
        self.state = {n: np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)]) for n, a in self.state.items()}
        self._free.extend(range(old + slots - 1, old - 1, -1))  # pop() hands out the lowest slot first

    def add(self, p: int, arrays: Arrays) -> None:
        assert self.slot_of[p] < 0, f"partition {p} is already held"
        if not self._free:
            self._grow(max(1, len(self.partitions) // 4))
        slot = self._free.pop()
        self.slot_of[p] = slot
        span = slice(slot * self._r, (slot + 1) * self._r)
        self.values[span] = np.asarray(arrays[VALUES]).astype(self.values.dtype, copy=False)
        for name, a in self.state.items():
            a[span] = arrays.get(name, 0)

    def remove(self, p: int) -> None:
        slot = int(self.slot_of[p])
        assert slot >= 0, f"partition {p} is not held"
        self.slot_of[p] = -1
        self._free.append(slot)

    def _view(self, p: int) -> Arrays:
        span = slice(int(self.slot_of[p]) * self._r, (int(self.slot_of[p]) + 1) * self._r)
        return {VALUES: self.values[span], **{n: a[span] for n, a in self.state.items()}}

    def export(self, p: int) -> Arrays:
        return {n: a.copy() for n, a in self._view(p).items()}

    def save(self, target: TableStore) -> None:
        for p in self.partitions:  # views, not copies: the caller holds the shard's lock
            target.write_partition(p, self._view(p))

    def resident_bytes(self) -> int:
        held = len(self.partitions) * self._r
        per_row = self.values.itemsize * self.spec.dim + sum(a.itemsize * math.prod(a.shape[1:])
                                                             for a in self.state.values())
        return held * per_row


ROW_SHARE = 0.9  # share of a cached tier's budget given to the hot-row cache (measured: bench/beyond_ram.py)
BEYOND_RAM_CHUNK_BYTES = 512 << 10  # largest chunk target of a table that will not fit its shards' budgets
MIN_CHUNK_BYTES = 128 << 10  # smallest one: smaller chunks slowed the memory path 1.4-2.9x (measured, below)
CHUNK_SET_SHARE = 0.3  # one chunk of every array together: at most this share of a shard's cache
DEFAULT_CACHE_SHARE = 0.5  # ShardConfig.cache_share's default (param_server/shard.py)


def fits_budget(spec: TableSpec, shard_budget_bytes: int | None, num_shards: int) -> bool:
    """Whether every shard's round-robin share of the partitions fits its budget (None: unbounded)."""
    if shard_budget_bytes is None:
        return True
    per_shard = -(-spec.num_partitions // max(1, num_shards))
    return partition_nbytes(spec) * per_shard <= shard_budget_bytes


def chunk_set_bytes_for(spec: TableSpec, target_chunk_bytes: int) -> int:
    """`chunk_set_bytes` of a table that `create_table(target_chunk_bytes=...)` would make."""
    return sum(_bytes_of_rows(a, a.chunks(spec, target_chunk_bytes)[1]) for a in table_arrays(spec).values())


def chunk_bytes_for_budget(spec: TableSpec, shard_budget_bytes: int | None, num_shards: int, *,
                           cache_share: float = DEFAULT_CACHE_SHARE) -> int:
    """The `create_table(target_chunk_bytes=...)` for a table served by `num_shards` shards of
    `shard_budget_bytes` each (None: unbounded) that keep `cache_share` of it for their caches:
    the 2 MiB default when every shard's partitions fit its budget; else the largest of 512 KiB,
    256 KiB, ... (not below `MIN_CHUNK_BYTES`) whose one chunk of every array together
    (`chunk_set_bytes`, the chunk cache's floor in `CachedTablePartitions`) is at most
    `CHUNK_SET_SHARE` of a shard's cache, so the hot-row cache keeps most of it.

    Why (docs/benchmarks.md, beyond-ram): the misses of a step are scattered rows, so nearly every
    chunk of a cached partition is touched whatever its size; through TensorStore every chunk
    write cost ~0.6-1.3 ms (a new file and a rename), which made small chunks slow and set 512 KiB.
    The raw engine (storage/chunk_io.py) writes a chunk in place in tens of microseconds, so I/O no
    longer sets the floor; the Python of the cache does. Measured (2026-12, 2 loaded cores, the
    `small` preset's shard: 0.75 MiB budget, cache_share 0.5, raw tables, in-process replay): 128 KiB
    chunks (row cache 0 rows) 6.7 / 4.7 ms per step (65,536 / 4,096 Zipf selections), 64 KiB (119
    rows, row hit rate 0.07-0.10) 9.4 / 8.6 ms, 32 KiB (183 rows, 0.10-0.15) 15.3 / 13.5 ms, 16 KiB
    25 ms: each step touches nearly every cached chunk, and with a chunk budget of one chunk of every
    array `update_rows` goes batch by batch (~0.7 ms of Python each), while a row cache of a
    few hundred rows hits little. So chunks stop at `MIN_CHUNK_BYTES`, even where that leaves the
    row cache of a very small budget empty; the rule shrinks them where the budget allows.
    """
    if fits_budget(spec, shard_budget_bytes, num_shards):
        return DEFAULT_TARGET_CHUNK_BYTES
    assert shard_budget_bytes is not None
    if not 0 < cache_share <= 1:
        raise ConfigError(f"cache_share must be in (0, 1], got {cache_share}")
    limit = CHUNK_SET_SHARE * shard_budget_bytes * cache_share
    target = BEYOND_RAM_CHUNK_BYTES
    while target > MIN_CHUNK_BYTES and chunk_set_bytes_for(spec, target) > limit:
        target //= 2
    return target


def work_table_options(spec: TableSpec, shard_budget_bytes: int | None, num_shards: int, *,
                       cache_share: float = DEFAULT_CACHE_SHARE) -> dict[str, Any]:
    """`create_table` keywords for the shards' work table of `spec` (orchestration/distributed.py):
    {"target_chunk_bytes": `chunk_bytes_for_budget`, "compress_state": whether it fits}. A table
    that will not fit is all raw (state uncompressed too), so its chunk cache writes in place."""
    return {"target_chunk_bytes": chunk_bytes_for_budget(spec, shard_budget_bytes, num_shards,
                                                         cache_share=cache_share),
            "compress_state": fits_budget(spec, shard_budget_bytes, num_shards)}


# counters carried over when add/remove rebuild the caches (the chunk I/O, and its io_* counters, is kept)
_SUMMED = ("hits", "misses", "evictions", "writebacks", "bytes_loaded", "bytes_written_back", "rows_read_in_place",
           "rows_written_in_place", "row_hits", "row_misses", "row_admissions", "row_evictions", "row_writebacks",
           "row_agings")


class CachedTablePartitions(TablePartitions):
    """Owned partitions served through a hot-row cache over a write-back chunk cache over `store` (DESIGN §5)."""

    def __init__(self, store: TableStore, partitions: Iterable[int], budget_bytes: int, *,
                 row_share: float = ROW_SHARE, io: ChunkIO | Engine | None = None) -> None:
        """Serve `partitions` of `store` in at most `budget_bytes` of RAM.

        Args:
            store: writable home of the partitions (dirty data is written back there).
            partitions: the partitions to serve.
            budget_bytes: RAM for rows and chunks together (bookkeeping of the row cache included).
            row_share: share of the budget for the hot-row cache; the chunk cache gets the rest, at
                least one chunk of the largest array (0: chunks only).
            io: chunk I/O: an engine name (None: raw in place for raw arrays, TensorStore for
                compressed ones; storage/chunk_io.py), opened once for the table's life and released
                by `close()`, or a `ChunkIO` over `store` that the caller keeps and closes.
        Raises: ConfigError for a row_share outside [0, 1).
        """
        if not 0 <= row_share < 1:
            raise ConfigError(f"row_share must be in [0, 1), got {row_share}")
        self.spec = store.spec
        self.store = store
        self.budget_bytes = int(budget_bytes)
        self.row_share = row_share
        self._owns_io = not isinstance(io, ChunkIO)
        self.io = io if isinstance(io, ChunkIO) else open_chunk_io(store, io)  # one ChunkIO for the table's life
        logger.info("table %s: cached partitions' chunk I/O by array: %s", self.spec.name, self.io.engines)
        not_raw = sorted(n for n, engine in self.io.engines.items() if engine != "raw")
        if not_raw and not store.read_only and io is None:
            logger.warning("table %s: arrays %s are not raw chunks, so the cache reads and writes them through "
                           "%s instead of in place (several times slower per chunk); a table created raw "
                           "(`ultramem table create --raw`, create_table(compress_state=False); `ultramem "
                           "train` makes its shards' work tables so) avoids that",
                           self.spec.name, not_raw, self.io.engines[not_raw[0]])
        self._names = store.array_names
        self._retired: dict[str, float] = {}  # counters of caches replaced by add/remove
        self._build(sorted(int(p) for p in partitions))

    def _build(self, partitions: list[int]) -> None:
        # at least one chunk of every array together, so an optimizer step loads each chunk once
        # (CachedPartitions.update_rows); less only when the budget is smaller than that
        chunk_bytes = max(min_cache_bytes(self.store), min(chunk_set_bytes(self.store), self.budget_bytes),
                          int(self.budget_bytes * (1 - self.row_share)))
        chunk_bytes = min(chunk_bytes, self.budget_bytes)
        lower = CachedPartitions(self.store, partitions, chunk_bytes, io=self.io)
        self._cache = HotRowCache(lower, self.budget_bytes - chunk_bytes)

    @property
    def partitions(self) -> tuple[int, ...]:
        return self._cache.partitions

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self._cache.read_rows(rows, names=[VALUES])[VALUES]

    def step(self, optimizer: SparseOptimizer, rows: np.ndarray, grads: np.ndarray, lr: float) -> None:
        # one read-modify-write: hot rows stepped in their row-cache slots, cold ones chunk batch by batch

        def apply_at(arrays: dict[str, np.ndarray], index: np.ndarray, pos: np.ndarray) -> None:
            state = {n: a for n, a in arrays.items() if n != VALUES}
            optimizer.step(arrays[VALUES], state, index, grads[pos], lr)

        def apply(block: dict[str, np.ndarray], pos: np.ndarray) -> None:
            apply_at(block, np.arange(pos.size), pos)

        self._cache.update_rows(rows, apply, update_at=apply_at)  # hot rows stepped in their slots

    def _rebuild(self, partitions: Iterable[int]) -> None:
        """A cache over another partition set (the old one flushed first; its rows and chunks are dropped).

        The chunk I/O's open files are released too: a partition that arrives may have been written
        by zarr-python (`add`) or by its previous owner, and one that leaves is another's to write."""
        self._cache.flush()
        self.io.close()
        for k, v in self._raw_metrics().items():
            if k in _SUMMED:
                self._retired[k] = self._retired.get(k, 0.0) + float(v)
        self._build(sorted(partitions))

    def add(self, p: int, arrays: Arrays | None) -> None:
        """Hold p; arrays None means the store already holds p's current state (a shared store)."""
        if arrays is not None:
            full = {n: arrays[n] for n in self._names if n in arrays}
            self.store.write_partition(p, full)
            missing = {n: np.zeros_like(a) for n, a in initial_arrays(self.spec, p).items() if n not in full}
            if missing:
                self.store.write_partition(p, missing)
        self._rebuild([*self.partitions, p])

    def remove(self, p: int) -> None:
        self._rebuild([q for q in self.partitions if q != p])

    def export(self, p: int) -> Arrays:
        # a hand-off: the next owner may read p from this store, so the files are closed as well as
        # flushed (on a network file system, close is what publishes in-place writes to other hosts)
        self._cache.flush()
        self.io.close()
        return self.store.read_partition(p)

    def save(self, target: TableStore) -> None:
        self._cache.copy_to(target)

    def flush(self) -> None:
        self._cache.flush()

    def close(self) -> None:
        """Flush, then release the chunk I/O's open files (if this object opened it)."""
        if not self.store.read_only:
            self._cache.flush()
        if self._owns_io:
            self.io.close()

    def resident_bytes(self) -> int:
        return int(self.metrics()["cache_bytes"])

    def _raw_metrics(self) -> dict[str, float]:
        chunk = {k: float(v) for k, v in self._cache.lower.metrics().items()}
        return {**chunk, **self._cache.metrics()}

    def metrics(self) -> dict[str, float]:
        """Chunk-cache counters (hits, misses, hit_rate, evictions, dirty_chunks, ...), the row cache's
        (row_hits, row_hit_rate, ...), and cache_bytes / budget_bytes covering both levels."""
        m = self._raw_metrics()
        for k, v in self._retired.items():
            m[k] += v
        m["chunk_bytes"] = m["cache_bytes"]
        m["cache_bytes"] = m["chunk_bytes"] + m["row_bytes"]
        m["chunk_budget_bytes"] = m["budget_bytes"]
        m["budget_bytes"] = float(self.budget_bytes)
        accesses = m["hits"] + m["misses"]
        m["hit_rate"] = m["hits"] / accesses if accesses else 0.0
        looked = m["row_hits"] + m["row_misses"]
        m["row_hit_rate"] = m["row_hits"] / looked if looked else 0.0
        return m


class TieredPartitions(TablePartitions):
    """Resident partitions plus (optionally) a chunk cache for the rest; rows are split by tier."""

    def __init__(self, spec: TableSpec, resident: ResidentPartitions, cached: CachedTablePartitions | None) -> None:
        self.spec = spec
        self.resident = resident
        self.cached = cached
        self._in_cache = np.zeros(spec.num_partitions, dtype=bool)
        if cached is not None:
            self._in_cache[list(cached.partitions)] = True

    @property
    def partitions(self) -> tuple[int, ...]:
        cached = self.cached.partitions if self.cached is not None else ()
        return tuple(sorted((*self.resident.partitions, *cached)))

    def is_cached(self, p: int) -> bool:
        return bool(self._in_cache[p])

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions [k] of rows served from RAM and [n - k] from the cache."""
        c = self._in_cache[partition_of_valid(rows, self.spec.num_partitions)]
        return np.flatnonzero(~c), np.flatnonzero(c)

    def source(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(resident table [N, d_v], flat positions [n] of `rows` in it) when every row is resident,
        so a kernel can read them in place (the pooled sum); None when some are served by the cache.
        Valid while the caller holds the shard's lock."""
        if self.cached is not None and self._in_cache[partition_of_valid(rows, self.spec.num_partitions)].any():
            return None
        return self.resident.values, self.resident._flat(rows)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self.cached is None:
            return self.resident.read(rows)
        ram, cache = self._split(rows)
        if cache.size == 0:
            return self.resident.read(rows)
        if ram.size == 0:  # all cached: no split copies
            return self.cached.read(rows)
        out = np.empty((rows.shape[0], self.spec.dim), dtype=numpy_dtype(self.spec.dtype))
        out[ram] = self.resident.read(rows[ram])
        out[cache] = self.cached.read(rows[cache])
        return out

    def step(self, optimizer: SparseOptimizer, rows: np.ndarray, grads: np.ndarray, lr: float) -> None:
        if self.cached is None:
            self.resident.step(optimizer, rows, grads, lr)
            return
        ram, cache = self._split(rows)
        if ram.size == 0:  # all cached: no split copies
            self.cached.step(optimizer, rows, grads, lr)
            return
        self.resident.step(optimizer, rows[ram], grads[ram], lr)
        if cache.size:
            self.cached.step(optimizer, rows[cache], grads[cache], lr)

    def add(self, p: int, arrays: Arrays | None, *, cached: bool = False) -> None:
        """Hold p in RAM, or through the cache (`cached`; arrays None = already in the cache's store)."""
        if cached:
            if self.cached is None:
                raise ConfigError(f"table {self.spec.name}: no chunk cache to hold partition {p}")
            self.cached.add(p, arrays)
            self._in_cache[p] = True
        else:
            assert arrays is not None
            self.resident.add(p, arrays)

    def remove(self, p: int) -> None:
        if self._in_cache[p]:
            assert self.cached is not None
            self.cached.remove(p)
            self._in_cache[p] = False
        else:
            self.resident.remove(p)

    def export(self, p: int) -> Arrays:
        if self._in_cache[p]:
            assert self.cached is not None
            return self.cached.export(p)
        return self.resident.export(p)

    def save(self, target: TableStore) -> None:
        self.resident.save(target)
        if self.cached is not None:
            self.cached.save(target)

    def flush(self) -> None:
        if self.cached is not None:
            self.cached.flush()

    def close(self) -> None:
        if self.cached is not None:
            self.cached.close()

    def resident_bytes(self) -> int:
        return self.resident.resident_bytes() + (self.cached.resident_bytes() if self.cached is not None else 0)

    def metrics(self) -> dict[str, float]:
        m = {"resident_partitions": float(len(self.resident.partitions)),
             "cached_partitions": float(len(self.cached.partitions)) if self.cached is not None else 0.0,
             "resident_bytes": float(self.resident.resident_bytes())}
        if self.cached is not None:
            m.update({f"cache_{k}" if not k.startswith("cache_") else k: v for k, v in self.cached.metrics().items()})
        return m
