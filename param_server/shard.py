"""One parameter-server shard: owned partitions in RAM, lookups, pooled sums, sparse updates.

DESIGN §4 (partitions, operations, consistency, sparse optimizers) and §3.1 step 6 (pooling done
on the shard). Plain Python over numpy, tested without gRPC or Ray; the servicer is a thin layer
on top. Per table the shard holds its owned partitions as one flat array [n_owned * R, d_v] plus
optimizer state arrays of the same leading size; global row r lives at
`slot[r % NP] * R + r // NP`, where slot numbers the owned partitions in ascending order.

Every public method validates all of its inputs first (typed errors, `param_server/errors.py`)
and only then touches state, so a bad request changes nothing. Pushes are queued
(`apply_queue.py`) and applied by one background thread; one lock covers each apply and every
read of the tables, so no lookup sees a half-updated row.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from param_server.apply_queue import ApplyQueue, PendingUpdate
from param_server.errors import (
    ConfigError,
    InvalidRequestError,
    ReadOnlyError,
    RequestTooLargeError,
    UnknownTableError,
    WaitTimeoutError,
    WrongShardError,
)
from param_server.metrics import ShardCounters
from param_server.optimizers import (
    SparseOptimizer,
    SparseOptimizerConfig,
    make_optimizer,
    segment_sum,
    sum_duplicates,
)
from storage.layout import VALUES, TableSpec, numpy_dtype, state_layout
from storage.table_store import TableStore, open_table

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16))


@dataclass(frozen=True)
class ShardConfig:
    """How a shard serves its tables."""

    max_pending: int = 1024  # queued pushes before RESOURCE_EXHAUSTED (DESIGN §4.3 backpressure)
    read_only: bool = False  # serving shards refuse pushes (DESIGN §6)
    wait_timeout_s: float = 30.0  # longest a min_step lookup waits before DEADLINE_EXCEEDED
    max_rows_per_request: int = 1 << 22  # rows (or pooled entries) in one request

    def __post_init__(self) -> None:
        if self.max_pending <= 0:
            raise ConfigError(f"shard.max_pending must be > 0, got {self.max_pending}")
        if not self.wait_timeout_s > 0:
            raise ConfigError(f"shard.wait_timeout_s must be > 0, got {self.wait_timeout_s}")
        if self.max_rows_per_request <= 0:
            raise ConfigError(f"shard.max_rows_per_request must be > 0, got {self.max_rows_per_request}")


@dataclass
class _Table:
    """A table's owned partitions, flat, with their optimizer state."""

    spec: TableSpec
    partitions: tuple[int, ...]  # owned, ascending; partitions[i] sits at slot i
    slot_of: np.ndarray  # int64 [NP], slot of each partition, -1 if not owned here
    values: np.ndarray  # [n_owned * R, d_v] in the spec dtype
    state: dict[str, np.ndarray]  # name -> [n_owned * R, ...]
    optimizer: SparseOptimizer

    def nbytes(self) -> int:
        return self.values.nbytes + sum(a.nbytes for a in self.state.values())


# --- request checks (no state touched) -----------------------------------------------------------


def _int_scalar(name: str, x: Any, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise InvalidRequestError(f"{name} must be an int >= {minimum}, got {x!r}")
    return int(x)


def _ids(name: str, a: Any) -> np.ndarray:
    """A 1-D integer array as int64 [n]."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise InvalidRequestError(f"{name} must be a 1-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64, copy=False)


def _floats(name: str, a: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A finite float array of exactly `shape`, as float32."""
    a = np.asarray(a)
    if a.dtype not in _FLOAT_DTYPES:
        raise InvalidRequestError(f"{name} must be float32/bfloat16/float16, got {a.dtype}")
    if a.shape != shape:
        raise InvalidRequestError(f"{name} must have shape {list(shape)}, got {list(a.shape)}")
    f = a.astype(np.float32, copy=False)
    if not np.isfinite(f).all():
        raise InvalidRequestError(f"{name} has non-finite entries")
    return f


def _pool_keys(token: np.ndarray, projector: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of the n entries by (token, projector) and the group starts: ([n], [G])."""
    key = token * e + projector  # [n], < 2**63 (checked)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.concatenate(([0], np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1))
    return order, starts


def pooled_sum(
    v: np.ndarray, projector: np.ndarray, token: np.ndarray, scores: np.ndarray, e: int
) -> tuple[np.ndarray, np.ndarray]:
    """IVE grouping + MCS weighting + pooling (DESIGN §3.1 steps 4-6) over gathered rows.

    v [n, d_v] (rows of the entries), projector/token int64 [n], scores float32 [n, h], e = E ->
    (tokens touched, sorted unique int64 [Tt]; sums float32 [Tt, E, d_v]) with
    o[t, p, slice c] = sum_j [proj_j = p][token_j = t] * s_c[j] * v[j, slice c].
    """
    n, d_v = v.shape
    h = scores.shape[1]
    weighted = (v.astype(np.float32).reshape(n, h, d_v // h) * scores[:, :, None]).reshape(n, d_v)
    order, starts = _pool_keys(token, projector, e)
    group_sums = segment_sum(np.take(weighted, order, axis=0), starts)  # [G, d_v]
    group_tok = token[order][starts]  # [G], ascending
    group_proj = projector[order][starts]
    new_token = np.concatenate(([True], group_tok[1:] != group_tok[:-1]))
    tokens = group_tok[new_token]  # [Tt]
    out = np.zeros((tokens.shape[0], e, d_v), dtype=np.float32)
    out[np.cumsum(new_token) - 1, group_proj] = group_sums  # each (token, projector) once
    return tokens, out


class Shard:
    """Owned partitions of some tables, served and updated (docs/internals.md "param_server/")."""

    def __init__(self, config: ShardConfig | None = None, shard_id: int = 0) -> None:
        self.config = config or ShardConfig()
        self.shard_id = shard_id
        self._tables: dict[str, _Table] = {}
        self._cond = threading.Condition()  # guards tables, applied clocks, counters
        # (worker, table) -> highest applied step. Per table: a worker pushes to every table each
        # step, and a lookup on table T must not pass because another table's push was applied.
        self._applied_step: dict[tuple[int, str], int] = {}
        self._applied_seq: dict[int, int] = {}
        self._counters = ShardCounters()
        self._queue = ApplyQueue(self.config.max_pending, self._apply, name=f"shard-{shard_id}-apply")

    # --- tables ----------------------------------------------------------------------------------

    def add_table(self, spec: TableSpec, partitions: dict[int, dict[str, np.ndarray]]) -> None:
        """Hold `partitions` of a table: {p: {"values": [R, d_v], state name: [R, ...]}}.

        Missing state arrays start at 0. The arrays are copied into the shard's flat layout.
        """
        r, layout = spec.rows_per_partition, state_layout(spec)
        owned = tuple(sorted(partitions))
        for p in owned:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < spec.num_partitions:
                raise InvalidRequestError(f"table {spec.name}: partition {p!r} not in [0, {spec.num_partitions})")
            arrays = partitions[p]
            unknown = sorted(set(arrays) - {VALUES, *layout})
            if VALUES not in arrays or unknown:
                raise InvalidRequestError(f"table {spec.name} partition {p}: needs 'values', unknown {unknown}")
            if np.shape(arrays[VALUES]) != (r, spec.dim):
                raise InvalidRequestError(f"table {spec.name} partition {p}: values must be [{r}, {spec.dim}]")
            for name, (trailing, _) in layout.items():
                if name in arrays and np.shape(arrays[name]) != (r, *trailing):
                    raise InvalidRequestError(f"table {spec.name} partition {p}: {name} must be {[r, *trailing]}")
        optimizer = make_optimizer(SparseOptimizerConfig.from_spec(spec))
        n = len(owned) * r
        values = np.empty((n, spec.dim), dtype=numpy_dtype(spec.dtype))
        state = {name: np.zeros((n, *trailing), dtype=dt) for name, (trailing, dt) in layout.items()}
        slot_of = np.full(spec.num_partitions, -1, dtype=np.int64)
        for i, p in enumerate(owned):
            slot_of[p] = i
            values[i * r : (i + 1) * r] = np.asarray(partitions[p][VALUES]).astype(values.dtype, copy=False)
            for name, arr in state.items():
                if name in partitions[p]:
                    arr[i * r : (i + 1) * r] = partitions[p][name]
        table = _Table(spec, tuple(int(p) for p in owned), slot_of, values, state, optimizer)
        with self._cond:
            if spec.name in self._tables:
                raise InvalidRequestError(f"shard {self.shard_id} already holds table {spec.name!r}")
            self._tables[spec.name] = table
        logger.info("shard %s holds table %s: %d partitions, %d bytes", self.shard_id, spec.name,
                    len(owned), table.nbytes())

    def load_table(self, store: TableStore, partitions: Iterable[int]) -> None:
        """Read `partitions` (values and optimizer state) from a table store and hold them."""
        self.add_table(store.spec, {int(p): store.read_partition(int(p)) for p in partitions})

    def table_names(self) -> list[str]:
        """Names of the tables this shard holds."""
        with self._cond:
            return sorted(self._tables)

    def spec(self, table: str) -> TableSpec:
        """The spec of a held table."""
        return self._table(table).spec

    def owned_partitions(self, table: str) -> list[int]:
        """Partitions of `table` held here, ascending."""
        return list(self._table(table).partitions)

    # --- lookups ---------------------------------------------------------------------------------

    def gather(
        self, table: str, rows: Any, *, worker_id: int = 0, min_step: int | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Values of `rows`: int64 [U] -> [U, d_v] in the table dtype (into `out` if given).

        Waits until `worker_id`'s applied step >= `min_step` when one is given (DESIGN §4.3).
        """
        t = self._table(table)
        slots = self._slots(t, rows, allow_empty=False)
        self._check_wait_args(worker_id, min_step)
        shape = (slots.shape[0], t.spec.dim)
        if out is not None and (out.shape != shape or out.dtype != t.values.dtype):
            raise InvalidRequestError(f"out must be {t.values.dtype} {list(shape)}")
        out = np.empty(shape, dtype=t.values.dtype) if out is None else out
        with self._cond:
            self._wait_for_step(worker_id, table, min_step)
            np.take(t.values, slots, axis=0, out=out)
            self._counters.count_lookup(slots.shape[0])
        return out

    def pooled_gather(
        self, table: str, rows: Any, projector: Any, token: Any, scores: Any, num_projectors: int, *,
        worker_id: int = 0, min_step: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pooled partial sums of this shard's rows (DESIGN §3.1 step 6, §4.2 PooledGather).

        rows/projector/token int64 [n], scores float32 [n, h], num_projectors = E ->
        (tokens touched, sorted unique int64 [Tt]; sums float32 [Tt, E, d_v]).
        """
        t = self._table(table)
        slots, projector, token, scores = self._pooled_args(t, rows, projector, token, scores, num_projectors,
                                                            allow_empty=False)
        self._check_wait_args(worker_id, min_step)
        with self._cond:
            self._wait_for_step(worker_id, table, min_step)
            v = np.take(t.values, slots, axis=0)  # [n, d_v]
            self._counters.count_lookup(slots.shape[0])
        return pooled_sum(v, projector, token, scores, int(num_projectors))

    # --- updates ---------------------------------------------------------------------------------

    def push(self, table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any, grads: Any) -> bool:
        """Queue a gradient push: rows int64 [U] (may repeat), grads [U, d_v].

        Returns False for a duplicate seq (acknowledged, dropped). An empty push is valid and only
        advances the worker's step. Raises QueueFullError (nothing queued) when the queue is full.
        """
        self._check_writable()
        t = self._table(table)
        worker_id, seq, step, lr = self._push_header(worker_id, seq, step, lr)
        slots = self._slots(t, rows, allow_empty=True)
        if slots.shape[0] == 0 and np.shape(grads) == (0,):
            grads = np.zeros((0, t.spec.dim), dtype=np.float32)
        g = _floats("grads", grads, (slots.shape[0], t.spec.dim))
        g = np.array(g, dtype=np.float32, copy=True)  # the queue owns its copy
        return self._queue.submit(PendingUpdate(table, worker_id, seq, step, lr, slots, g))

    def pooled_backward(
        self, table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any, projector: Any,
        token: Any, scores: Any, grad_out: Any, tokens_touched: Any, num_projectors: int,
    ) -> np.ndarray:
        """dL/ds float32 [n, h] from the current values; queues the row update (see below)."""
        return self.pooled_backward_with_ack(table, worker_id, seq, step, lr, rows, projector, token, scores,
                                             grad_out, tokens_touched, num_projectors)[0]

    def pooled_backward_with_ack(
        self, table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any, projector: Any,
        token: Any, scores: Any, grad_out: Any, tokens_touched: Any, num_projectors: int,
    ) -> tuple[np.ndarray, bool]:
        """Backward of `pooled_gather` (DESIGN §4.2 PooledBackward).

        rows/projector/token int64 [n], scores float32 [n, h], grad_out float32 [Tt, E, d_v] = dL/do
        for tokens_touched int64 [Tt] (sorted unique, holding every token) ->
        (dL/ds float32 [n, h], accepted). dL/ds[j, c] = <dL/do[t_j, p_j, slice c], V[row_j, slice c]>
        with V as it is now; the update dL/dV[row_j, slice c] = s_c[j] * dL/do[t_j, p_j, slice c] is
        queued like a push (accepted False: a duplicate seq, dropped, dL/ds still answered).
        """
        self._check_writable()
        t = self._table(table)
        worker_id, seq, step, lr = self._push_header(worker_id, seq, step, lr)
        slots, projector, token, scores = self._pooled_args(t, rows, projector, token, scores, num_projectors,
                                                            allow_empty=True)
        e, d_v, n, h = int(num_projectors), t.spec.dim, slots.shape[0], scores.shape[1]
        touched = _ids("tokens_touched", tokens_touched)
        if touched.shape[0] > 1 and not np.all(touched[1:] > touched[:-1]):
            raise InvalidRequestError("tokens_touched must be sorted and unique")
        g_out = _floats("grad_out", grad_out, (touched.shape[0], e, d_v))
        t_pos = np.searchsorted(touched, token)  # [n]
        if n and (t_pos.max() >= touched.shape[0] or np.any(touched[t_pos] != token)):
            raise InvalidRequestError("every token must appear in tokens_touched")
        with self._cond:
            v = np.take(t.values, slots, axis=0)  # [n, d_v]
        g = g_out[t_pos, projector].reshape(n, h, d_v // h)  # dL/do per entry, [n, h, d_v/h]
        v = v.astype(np.float32).reshape(n, h, d_v // h)
        grad_scores = np.einsum("nhk,nhk->nh", g, v)  # [n, h]
        grad_rows = (g * scores[:, :, None]).reshape(n, d_v)  # [n, d_v], rows may repeat
        accepted = self._queue.submit(PendingUpdate(table, worker_id, seq, step, lr, slots, grad_rows))
        return grad_scores.astype(np.float32, copy=False), accepted

    def _apply(self, update: PendingUpdate) -> None:
        """Apply one push on the apply thread: duplicates summed, one optimizer step per row."""
        t = self._tables[update.table]
        slots, grads = sum_duplicates(update.slots, update.grads)
        with self._cond:
            try:
                t.optimizer.step(t.values, t.state, slots, grads, update.lr)
            finally:  # advance the clock even if a bug raised, so lookups never hang on it
                w = update.worker_id
                key = (w, update.table)
                self._applied_step[key] = max(self._applied_step.get(key, -1), update.step)
                self._applied_seq[w] = max(self._applied_seq.get(w, 0), update.seq)
                self._counters.count_apply(slots.shape[0])
                self._cond.notify_all()

    # --- clocks, drain, checkpoint ---------------------------------------------------------------

    def applied_step(self, worker_id: int, table: str | None = None) -> int:
        """The highest step of `worker_id` whose push to `table` has been applied (-1 if none).

        With no table: the lowest such step over the tables this worker has pushed to.
        """
        with self._cond:
            if table is not None:
                return self._applied_step.get((worker_id, table), -1)
            steps = [s for (w, _), s in self._applied_step.items() if w == worker_id]
            return min(steps) if steps else -1

    def last_seq(self, worker_id: int) -> int:
        """The last seq accepted from `worker_id` (0 if none)."""
        return self._queue.last_seq(worker_id)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every accepted push is applied (WaitTimeoutError after `timeout` s)."""
        self._queue.drain(timeout)

    def export_partitions(self, table: str) -> dict[int, dict[str, np.ndarray]]:
        """Copies of the owned partitions after a drain: {p: {"values": [R, d_v], state: [R, ...]}}."""
        t = self._table(table)
        self.drain()
        r = t.spec.rows_per_partition
        with self._cond:
            return {
                p: {VALUES: t.values[i * r : (i + 1) * r].copy(),
                    **{k: a[i * r : (i + 1) * r].copy() for k, a in t.state.items()}}
                for i, p in enumerate(t.partitions)
            }

    def save(self, root_of_tables: Path | str) -> None:
        """Drain, then write every owned partition into the existing groups `root_of_tables/<table>`."""
        root = Path(root_of_tables)
        for name in self.table_names():
            spec = self.spec(name)
            store = open_table(root / name, "r+")
            if (store.spec.rows, store.spec.dim, store.spec.num_partitions, store.spec.dtype,
                    store.spec.optimizer) != (spec.rows, spec.dim, spec.num_partitions, spec.dtype, spec.optimizer):
                raise InvalidRequestError(f"table group {root / name} has spec {store.spec}, shard holds {spec}")
            for p, arrays in self.export_partitions(name).items():
                store.write_partition(p, arrays)
        logger.info("shard %s saved %s into %s", self.shard_id, self.table_names(), root)

    def metrics(self) -> dict[str, float]:
        """Counters and gauges: lookups, rows, pushes, queue depth, applied steps, bytes resident."""
        with self._cond:
            out = self._counters.as_dict()
            out["bytes_resident"] = float(sum(t.nbytes() for t in self._tables.values()))
            for (w, name), s in self._applied_step.items():
                out[f"applied_step.worker.{w}.{name}"] = float(s)
        q = self._queue
        out.update(queue_depth=float(q.depth()), pushes_accepted=float(q.accepted),
                   pushes_duplicate=float(q.duplicates), queue_full_rejections=float(q.rejected_full),
                   apply_errors=float(q.apply_errors))
        return out

    def close(self) -> None:
        """Refuse new pushes, apply the queued ones, stop the apply thread."""
        self._queue.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers ---------------------------------------------------------------------------------

    def _table(self, name: str) -> _Table:
        t = self._tables.get(name)
        if t is None:
            raise UnknownTableError(f"shard {self.shard_id} holds no table {name!r}")
        return t

    def _check_writable(self) -> None:
        if self.config.read_only:
            raise ReadOnlyError(f"shard {self.shard_id} is read-only")

    def _slots(self, t: _Table, rows: Any, *, allow_empty: bool) -> np.ndarray:
        """Validated global rows [n] -> flat slots [n]."""
        rows = _ids("rows", rows)
        n = rows.shape[0]
        if n == 0 and not allow_empty:
            raise InvalidRequestError("empty lookup: rows must hold at least one row")
        if n > self.config.max_rows_per_request:
            raise RequestTooLargeError(f"{n} rows > max_rows_per_request {self.config.max_rows_per_request}")
        if n and (rows.min() < 0 or rows.max() >= t.spec.rows):
            raise InvalidRequestError(f"rows must be in [0, {t.spec.rows}) for table {t.spec.name}")
        part = rows % t.spec.num_partitions
        slot = t.slot_of[part]
        if n and slot.min() < 0:
            missing = np.unique(part[slot < 0])[:8].tolist()
            raise WrongShardError(f"shard {self.shard_id} does not own partitions {missing} of {t.spec.name}")
        return slot * t.spec.rows_per_partition + rows // t.spec.num_partitions

    def _pooled_args(
        self, t: _Table, rows: Any, projector: Any, token: Any, scores: Any, num_projectors: Any, *,
        allow_empty: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validated (slots [n], projector [n], token [n], scores float32 [n, h])."""
        slots = self._slots(t, rows, allow_empty=allow_empty)
        n = slots.shape[0]
        e = _int_scalar("num_projectors", num_projectors, 1)
        projector, token = _ids("projector", projector), _ids("token", token)
        if projector.shape[0] != n or token.shape[0] != n:
            raise InvalidRequestError(f"rows, projector, token lengths differ: {n}, {projector.shape[0]}, "
                                      f"{token.shape[0]}")
        if n and (projector.min() < 0 or projector.max() >= e):
            raise InvalidRequestError(f"projector ids must be in [0, {e})")
        if n and (token.min() < 0 or token.max() >= (2**63 - 1) // e):
            raise InvalidRequestError("token ids must be >= 0 (and token * E must fit in int64)")
        s = np.asarray(scores)
        h = s.shape[1] if s.ndim == 2 else 0
        if h < 1 or t.spec.dim % h:
            raise InvalidRequestError(f"scores must be [n, h] with h >= 1 dividing d_v={t.spec.dim}, got {s.shape}")
        return slots, projector, token, _floats("scores", s, (n, h))

    @staticmethod
    def _push_header(worker_id: Any, seq: Any, step: Any, lr: Any) -> tuple[int, int, int, float]:
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
            raise InvalidRequestError(f"lr must be a float, got {lr!r}")
        if not (math.isfinite(lr) and lr >= 0):
            raise InvalidRequestError(f"lr must be finite and >= 0, got {lr}")
        # step >= -1, not >= 0: a client marks all but the last chunk of a split push with step - 1,
        # so a min_step lookup waits for the whole push (DESIGN §4.3). At step 0 that is -1, which
        # is also the clock's "nothing applied" value, so such a chunk advances no clock.
        return (_int_scalar("worker_id", worker_id, 0), _int_scalar("seq", seq, 1),
                _int_scalar("step", step, -1), float(lr))

    @staticmethod
    def _check_wait_args(worker_id: Any, min_step: Any) -> None:
        _int_scalar("worker_id", worker_id, 0)
        if min_step is not None:
            _int_scalar("min_step", min_step, -(2**63))

    def _wait_for_step(self, worker_id: int, table: str, min_step: int | None) -> None:
        """With self._cond held: wait until the worker's applied step on `table` >= min_step."""
        if min_step is None:
            return
        key = (worker_id, table)
        if not self._cond.wait_for(lambda: self._applied_step.get(key, -1) >= min_step,
                                   self.config.wait_timeout_s):
            self._counters.wait_timeouts += 1
            raise WaitTimeoutError(
                f"worker {worker_id} step {min_step} not applied within {self.config.wait_timeout_s} s "
                f"on table {table} (applied: {self._applied_step.get(key, -1)})"
            )
