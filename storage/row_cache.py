"""A row-granular hot-row cache in front of the chunk cache (DESIGN §5 "beyond RAM", §3.1 IVE).

IVE's permutation and the `r mod NP` partitioning scatter the hot rows of a table over every
chunk, so a cache of whole chunks cannot keep them: with 25% of rows taking 84% of lookups, the
hottest 25% of chunks still took only 25% of chunk accesses (docs/benchmarks.md, beyond-ram).
`HotRowCache` keeps *individual* rows in RAM, each with all its arrays (values and optimizer
state together, so an update of a hot row never leaves RAM), and sends the rest to a
`CachedPartitions` below it.

- **Slots.** `capacity` rows preallocated per array ([capacity, *trailing] in the logical dtype);
  a dense index maps each row of the cached partitions to its slot (int32, -1 when not cached).
- **Admission by frequency** (TinyLFU's rule): every looked-up row bumps a saturating uint16
  counter (once per request); all counters halve after `aging_window` counted lookups, so old
  popularity fades. A missed row takes a free slot if there is one; otherwise it replaces the
  least frequent cached row not used by the same request, and only when it is strictly more
  frequent. A batch is decided at once: candidates by falling count against victims by rising
  count, so the admitted rows are exactly the prefix where the candidate wins.
- **Write-back.** Rows written while cached become dirty; a dirty row is written into its chunk
  when it is evicted and on `flush()`: into the chunk cache's copy when that chunk is held, else
  straight into the chunk file in place (`CachedPartitions.write_rows(load=False)`, raw arrays), so
  an eviction never loads a chunk to change one row of it. The chunk cache is the single writer of
  its partitions either way. Rows that are not admitted are read from and written to the chunk
  cache directly.
- **Budget.** Slots, their bookkeeping (9 B each) and the index (6 B per row of the cached
  partitions) together stay within `budget_bytes`; the capacity is fixed at construction, so the
  cache can never hold more. A budget too small for the index gives capacity 0: a pass-through.

Same contract as `CachedPartitions` (a numpy oracle of the whole table): a read returns what was
last written, and after `flush()` the store holds exactly what the oracle holds
(tests/storage/test_row_cache.py). Rows are global rows; callers of `slots`/`arrays` (the cached
ones changing rows in place) must call `mark_dirty` for the slots they change; the cached tier's
optimizer step goes through `update_rows` instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from storage.chunk_cache import CachedPartitions, RowUpdate, RowUpdateAt
from storage.errors import LayoutError, ReadOnlyTableError
from storage.table_store import TableStore

logger = logging.getLogger(__name__)

INDEX_BYTES_PER_ROW = 4 + 2  # slot (int32) + access counter (uint16) per row of the cached partitions
SLOT_OVERHEAD_BYTES = 8 + 1  # row of the slot (int64) + dirty flag per slot
_MAX_COUNT = np.iinfo(np.uint16).max



class HotRowCache:
    """Hot rows (all arrays) in RAM, admitted by access frequency, over a `CachedPartitions`."""

    def __init__(self, lower: CachedPartitions, budget_bytes: int, *, aging_window: int | None = None) -> None:
        """Cache hot rows of `lower`'s partitions in at most `budget_bytes` (slots + index).

        Args:
            lower: the chunk cache that serves every row not held here (and receives write-backs).
            budget_bytes: RAM for this cache, bookkeeping included; capacity 0 when it is too small.
            aging_window: counted lookups between two halvings of every counter (default 10x capacity).
        Raises: LayoutError for a negative budget or a non-positive aging window.
        """
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 0:
            raise LayoutError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
        self.lower = lower
        self.spec = lower.spec
        self.partitions = lower.partitions
        self.names: tuple[str, ...] = lower.store.array_names
        self._r = self.spec.rows_per_partition
        n_index = len(self.partitions) * self._r
        templates = {n: lower.templates[n] for n in self.names}
        self.row_bytes = sum(int(np.prod(t.shape[1:], dtype=np.int64)) * t.dtype.itemsize for t in templates.values())
        room = int(budget_bytes) - n_index * INDEX_BYTES_PER_ROW
        self.capacity = max(0, min(n_index, room // (self.row_bytes + SLOT_OVERHEAD_BYTES)))
        if self.capacity == 0:
            n_index = 0  # a pass-through keeps no index either
        self.budget_bytes = int(budget_bytes)
        self.nbytes = self.capacity * (self.row_bytes + SLOT_OVERHEAD_BYTES) + n_index * INDEX_BYTES_PER_ROW
        assert self.nbytes <= self.budget_bytes or self.capacity == 0
        if aging_window is not None and aging_window <= 0:
            raise LayoutError(f"aging_window must be > 0, got {aging_window}")
        self.aging_window = aging_window or 10 * max(1, self.capacity)
        self._pos = np.full(self.spec.num_partitions, -1, dtype=np.int64)  # partition -> its block of the index
        self._pos[list(self.partitions)] = np.arange(len(self.partitions))
        self._part_of_pos = np.asarray(self.partitions, dtype=np.int64)
        self._slot_of = np.full(n_index, -1, dtype=np.int32)
        self._count = np.zeros(n_index, dtype=np.uint16)
        self._index_of_slot = np.full(self.capacity, -1, dtype=np.int64)
        self._dirty = np.zeros(self.capacity, dtype=bool)
        self.arrays = {n: np.zeros((self.capacity, *t.shape[1:]), dtype=t.dtype) for n, t in templates.items()}
        self._used = 0  # slots [0, used) hold rows; a slot is only ever freed by a replacement
        self._since_aging = 0
        self._lock = threading.RLock()
        self._counters = dict.fromkeys(("row_hits", "row_misses", "row_admissions", "row_evictions",
                                        "row_writebacks", "row_agings"), 0)

    def __repr__(self) -> str:
        return f"HotRowCache({self.spec.name!r}, capacity={self.capacity} rows, {self.nbytes} B)"

    # --- public API --------------------------------------------------------------------------

    def read_rows(self, rows: np.ndarray, names: Sequence[str] | None = None, *,
                  count: bool = True) -> dict[str, np.ndarray]:
        """Rows of the table: rows int [N] global (may repeat) -> {name: [N, ...]} fresh arrays.

        count=True (a lookup) bumps each row's counter once and counts row hits/misses; the cached
        tier's optimizer step reads with count=False. Missed rows may be admitted (all their arrays
        are then read from the chunk cache). Raises LayoutError (nothing read) for a bad row or name.
        """
        names = self.lower.check_names(names)
        idx = self._index(rows)
        with self._lock:
            if self.capacity == 0:
                if count:
                    self._counters["row_misses"] += len(np.unique(idx))
                return self.lower.read_rows(rows, names)
            u, inv = np.unique(idx, return_inverse=True)
            if count:
                self._touch(u)
            slot = self._slot_of[u]
            hit = np.flatnonzero(slot >= 0)
            miss = np.flatnonzero(slot < 0)
            # without repeats each unique row goes straight to its place in the answer (u[j] is
            # rows[dest[j]]); with repeats the answer is built per unique row, then expanded by inv
            dest = None
            if len(u) == len(idx):
                dest = np.empty(len(u), dtype=np.int64)
                dest[inv] = np.arange(len(u))
            out = {n: np.empty((len(u), *self.arrays[n].shape[1:]), self.arrays[n].dtype) for n in names}

            def put(at: np.ndarray, got: Mapping[str, np.ndarray]) -> None:
                where = at if dest is None else dest[at]
                for n in names:
                    out[n][where] = got[n]

            if hit.size:
                put(hit, {n: self.arrays[n][slot[hit]] for n in names})
            if count:
                self._counters["row_hits"] += hit.size
                self._counters["row_misses"] += miss.size
            if miss.size:
                admit, slots = self._choose(u[miss], protect=slot[hit])
                if admit.size:
                    put(miss[admit], self._install(u[miss[admit]], slots, None))
                rest = np.delete(miss, admit)
                if rest.size:  # chunks with few of these rows are not loaded: rows read from the files
                    put(rest, self.lower.read_rows(self._global(u[rest]), names, load=False))
            return out if dest is not None else {n: a[inv] for n, a in out.items()}

    def write_rows(self, rows: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """Overwrite rows: rows int [N] global and unique, arrays {name: [N, ...]} in exact dtypes.

        Cached rows are written in RAM (dirty); a missed row is admitted when all arrays are given
        and it wins a slot, otherwise written to the chunk cache.
        Raises (nothing written): LayoutError for duplicate, out-of-range or foreign rows, an unknown
        name, a wrong dtype or shape; ReadOnlyTableError when the store is open read-only.
        """
        if self.lower.store.read_only:
            raise ReadOnlyTableError(f"table {self.spec.name} at {self.lower.store.path} is open read-only")
        idx = self._index(rows)
        if len(np.unique(idx)) != len(idx):
            raise LayoutError(f"table {self.spec.name}: write_rows got duplicate rows")
        checked = dict(self.lower.check_arrays(arrays, len(idx)))
        with self._lock:
            if self.capacity == 0:
                self.lower.write_rows(rows, checked)
                return
            slot = self._slot_of[idx]
            hit = slot >= 0
            for n, data in checked.items():
                self.arrays[n][slot[hit]] = data[hit]
            self._dirty[slot[hit]] = True
            miss = np.flatnonzero(~hit)
            if miss.size == 0:
                return
            admit = np.zeros(0, dtype=np.int64)
            if set(checked) == set(self.names):
                admit, slots = self._choose(idx[miss], protect=slot[hit])
                if admit.size:
                    self._install(idx[miss[admit]], slots, {n: d[miss[admit]] for n, d in checked.items()})
            rest = np.delete(miss, admit)
            if rest.size:
                self.lower.write_rows(self._global(idx[rest]), {n: d[rest] for n, d in checked.items()})

    def update_rows(self, rows: np.ndarray, update: RowUpdate, *, update_at: RowUpdateAt | None = None) -> None:
        """Read-modify-write unique global rows int [N] with `update(block, positions)` (see
        `CachedPartitions.update_rows`): cached rows as one block in RAM (then dirty), the others
        in one pass over their chunks below; counts nothing and admits nothing.

        update_at, when given, changes the cached rows where they are held instead of in a copied
        block: `update_at(arrays, index, positions)` gets the slot arrays {name: [capacity, ...]},
        index int64 [k] (the rows' slots) and positions int64 [k] into `rows`, and changes
        arrays[name][index] in place (as a sparse optimizer's step does; it saves a gather and a
        scatter of every array). The rows that are not cached are then changed the same way inside
        the chunk cache's held chunks where it can (`CachedPartitions.update_rows(update_at=)`):
        arrays are views of those chunks and index the rows in them.
        Raises (nothing changed): LayoutError for duplicate, out-of-range or foreign rows;
        ReadOnlyTableError when the store is open read-only.
        """
        if self.lower.store.read_only:
            raise ReadOnlyTableError(f"table {self.spec.name} at {self.lower.store.path} is open read-only")
        idx = self._index(rows)
        if len(np.unique(idx)) != len(idx):
            raise LayoutError(f"table {self.spec.name}: update_rows got duplicate rows")
        with self._lock:
            slot = self._slot_of[idx] if self.capacity else np.full(len(idx), -1, np.int32)
            hit = np.flatnonzero(slot >= 0)
            if hit.size:
                s = slot[hit].astype(np.int64)
                if update_at is not None:
                    update_at(self.arrays, s, hit)
                else:
                    block = {n: a[s] for n, a in self.arrays.items()}
                    update(block, hit)
                    for n, a in self.arrays.items():
                        a[s] = block[n]
                self._dirty[s] = True
            miss = np.flatnonzero(slot < 0)
            if miss.size:
                at = None if update_at is None else (lambda a, index, pos: update_at(a, index, miss[pos]))
                self.lower.update_rows(self._global(idx[miss]), lambda block, pos: update(block, miss[pos]),
                                       update_at=at)

    def slots(self, rows: np.ndarray) -> np.ndarray:
        """Slot of each global row int [N] -> int64 [N] (-1: not cached); counts nothing."""
        idx = self._index(rows)
        with self._lock:
            return self._slot_of[idx].astype(np.int64) if self.capacity else np.full(len(idx), -1, np.int64)

    def mark_dirty(self, slots: np.ndarray) -> None:
        """Slots whose rows were changed in place through `arrays` (must reach the store later)."""
        with self._lock:
            self._dirty[slots] = True

    def flush(self) -> None:
        """Write every dirty row to the chunk cache, then flush the chunk cache; rows stay cached, clean."""
        with self._lock:
            dirty = np.flatnonzero(self._dirty)
            if dirty.size:
                self.lower.write_rows(self._global(self._index_of_slot[dirty]),
                                      {n: a[dirty] for n, a in self.arrays.items()}, load=False)
                self._dirty[dirty] = False
                self._counters["row_writebacks"] += dirty.size
            self.lower.flush()

    def close(self) -> None:
        """Flush, then close the chunk cache below (which releases the files of an engine it owns)."""
        with self._lock:
            if not self.lower.store.read_only:
                self.flush()
            self.lower.close()

    def copy_to(self, target: TableStore) -> None:
        """Flush, then copy the owned partitions into `target` (see `CachedPartitions.copy_to`)."""
        with self._lock:
            self.flush()
            self.lower.copy_to(target)

    def metrics(self) -> dict[str, float]:
        """Row counters: row_capacity, row_cached, row_dirty, row_bytes (RAM taken, bookkeeping
        included), row_budget_bytes, row_hits / row_misses (unique rows per lookup), row_hit_rate,
        row_admissions, row_evictions, row_writebacks, row_agings."""
        with self._lock:
            c = {k: float(v) for k, v in self._counters.items()}
            looked = c["row_hits"] + c["row_misses"]
            return {"row_capacity": float(self.capacity), "row_cached": float(self._used),
                    "row_dirty": float(self._dirty.sum()), "row_bytes": float(self.nbytes),
                    "row_budget_bytes": float(self.budget_bytes), **c,
                    "row_hit_rate": c["row_hits"] / looked if looked else 0.0}

    # --- internals ---------------------------------------------------------------------------

    def _index(self, rows: Any) -> np.ndarray:
        """Global rows -> int64 [N] positions in the index (validated by the chunk cache's rules)."""
        part, local = self.lower.check_rows(rows)
        return self._pos[part] * self._r + local

    def _global(self, idx: np.ndarray) -> np.ndarray:
        pos, local = np.divmod(idx, self._r)
        return local * self.spec.num_partitions + self._part_of_pos[pos]

    def _touch(self, u: np.ndarray) -> None:
        """Count one lookup of each unique index u; halve every counter once per aging window."""
        self._count[u] = np.minimum(self._count[u].astype(np.int32) + 1, _MAX_COUNT).astype(np.uint16)
        self._since_aging += len(u)
        if self._since_aging >= self.aging_window:
            self._count >>= 1
            self._since_aging = 0
            self._counters["row_agings"] += 1

    def _choose(self, cand: np.ndarray, protect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which candidates (indices, not cached) get a slot, and which slot each takes.

        Returns (positions into cand int64 [k], slots int64 [k]). Free slots go to the most
        frequent candidates; then a candidate replaces a victim (least frequent cached row outside
        `protect`, the slots this request uses) only if strictly more frequent.
        """
        order = np.argsort(-self._count[cand].astype(np.int32), kind="stable")
        n_free = min(self.capacity - self._used, len(cand))
        pos = [order[:n_free]]
        slots = [np.arange(self._used, self._used + n_free, dtype=np.int64)]
        self._used += n_free
        rest = order[n_free:]
        if rest.size and self._used == self.capacity:
            victim_count = self._count[self._index_of_slot].astype(np.int32)
            victim_count[protect] = _MAX_COUNT + 1  # never evict a row this request is using
            victim_count[slots[0]] = _MAX_COUNT + 1
            k = min(rest.size, self.capacity)
            victims = np.argpartition(victim_count, k - 1)[:k] if k < self.capacity else np.arange(k)
            victims = victims[np.argsort(victim_count[victims], kind="stable")]
            wins = self._count[cand[rest[:k]]].astype(np.int32) > victim_count[victims]
            n_win = int(np.argmin(wins)) if not wins.all() else k  # a prefix: counts fall, victims' rise
            pos.append(rest[:n_win])
            slots.append(victims[:n_win].astype(np.int64))
        return np.concatenate(pos), np.concatenate(slots)

    def _install(self, idx: np.ndarray, slots: np.ndarray, data: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Put rows idx into slots (evicting their rows first); data None reads every array from below.

        Returns the installed arrays {name: [k, ...]}. Rows written by the caller (data given) are dirty.
        """
        self._evict(slots)
        written = data is not None
        if data is None:  # rows of chunks not held are read from their files, not loaded with their chunk
            data = self.lower.read_rows(self._global(idx), self.names, load=False)
        for n, a in self.arrays.items():
            a[slots] = data[n]
        self._slot_of[idx] = slots
        self._index_of_slot[slots] = idx
        self._dirty[slots] = written
        self._counters["row_admissions"] += len(idx)
        return data

    def _evict(self, slots: np.ndarray) -> None:
        """Empty the given slots: dirty rows are written to the chunk cache first, then unmapped."""
        held = slots[self._index_of_slot[slots] >= 0]
        if held.size == 0:
            return
        dirty = held[self._dirty[held]]
        if dirty.size:  # into their chunks: in place in the chunk files where a chunk is not held
            self.lower.write_rows(self._global(self._index_of_slot[dirty]),
                                  {n: a[dirty] for n, a in self.arrays.items()}, load=False)
            self._counters["row_writebacks"] += dirty.size
        self._slot_of[self._index_of_slot[held]] = -1
        self._index_of_slot[held] = -1
        self._dirty[held] = False
        self._counters["row_evictions"] += held.size
