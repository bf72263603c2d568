"""One parameter-server shard: owned partitions, lookups, pooled sums, sparse updates, hand-offs.

DESIGN §4 (partitions, operations, consistency, sparse optimizers), §3.1 step 6 (pooling done on
the shard) and §5 (resident partitions, or a chunk cache beyond the RAM budget). Plain Python over
numpy, tested without gRPC or Ray; the servicer is a thin layer on top. Per table the shard holds
its owned partitions in a `param_server.partitions.TieredPartitions`: those that fit
`ShardConfig.ram_budget_bytes` in RAM (flat arrays), the rest through a write-back chunk cache over
the table's Zarr group. Queued updates carry global rows, so partitions can come and go.

Rescaling (DESIGN §4.1) moves whole partitions: `freeze` pauses pushes to them, `handoff_export`
drains and copies them out, the new owner `adopt`s them, the coordinator bumps the map epoch, and
`release` drops them here (paused pushes then fail as WrongShardError and the client re-routes).
The applied-step clocks (DESIGN §4.3, `param_server/clocks.py`) go along (`clocks` /
`merge_clocks`); a min_step lookup also waits for pushes of that step still queued, so a push
re-routed during a hand-off is never missed.

Every public method validates all of its inputs first (typed errors, `param_server/errors.py`)
and only then touches state, so a bad request changes nothing. Pushes are queued
(`apply_queue.py`) and applied by one background thread; one lock covers each apply and every
read of the tables, so no lookup sees a half-updated row. With an update log attached
(`attach_log`, `param_server/update_log.py`) every admitted push is recorded before it is queued
and acknowledged; `replay` applies such records again after a restart from a checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from param_server.apply_queue import ApplyQueue, PendingUpdate
from param_server.checks import (
    check_partition_arrays,
    check_wait_args,
    floats,
    ids,
    pooled_entries,
    positions_in,
    push_header,
    unique_inverse,
)
from param_server.clocks import StepClocks
from param_server.errors import (
    ConfigError,
    InvalidRequestError,
    QueueFullError,
    ReadOnlyError,
    RequestTooLargeError,
    UnknownTableError,
    WaitTimeoutError,
    WrongShardError,
)
from param_server.kernels import warm_up
from param_server.metrics import ShardCounters
from param_server.optimizers import (
    SparseOptimizer,
    SparseOptimizerConfig,
    make_optimizer,
    sum_duplicates,
)
from param_server.partitions import (
    DEFAULT_CACHE_SHARE,
    Arrays,
    CachedTablePartitions,
    ResidentPartitions,
    TieredPartitions,
    copy_partition,
    initial_arrays,
    min_cache_bytes,
    partition_nbytes,
    partition_of_valid,
    plan_tiers,
    zero_state,
)
from param_server.pooling import pooled_backward, pooled_sum, pre_value_backward, pre_value_scores
from param_server.scratch import ScratchPool
from param_server.update_log import LogRecord, UpdateLog
from storage.layout import TableSpec
from storage.table_store import TableStore, open_table

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)


def _same_seq_groups(records: Iterable[LogRecord]) -> Iterable[list[LogRecord]]:
    """Consecutive log records of one (worker, seq), grouped: `_log_admitted` writes one record per
    table of an update (a pooled backward with pre-values touches two) one after the other."""
    group: list[LogRecord] = []
    for rec in records:
        if group and (rec.worker_id, rec.seq) != (group[0].worker_id, group[0].seq):
            yield group
            group = []
        group.append(rec)
    if group:
        yield group


@dataclass(frozen=True)
class ShardConfig:
    """How a shard serves its tables."""

    max_pending: int = 1024  # queued pushes before RESOURCE_EXHAUSTED (DESIGN §4.3 backpressure)
    read_only: bool = False  # serving shards refuse pushes (DESIGN §6)
    wait_timeout_s: float = 30.0  # longest a min_step lookup waits before DEADLINE_EXCEEDED
    max_rows_per_request: int = 1 << 22  # rows (or pooled entries) in one request
    ram_budget_bytes: int | None = None  # partition data held in RAM; None = everything resident (§5)
    cache_share: float = DEFAULT_CACHE_SHARE  # share of the budget kept for the caches when not everything fits
    # kept buffers for the row gradients a pooled backward queues (param_server/scratch.py), outside
    # ram_budget_bytes; 0 = a fresh array per call
    scratch_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.ram_budget_bytes is not None and self.ram_budget_bytes <= 0:
            raise ConfigError(f"shard.ram_budget_bytes must be > 0, got {self.ram_budget_bytes}")
        if not 0 < self.cache_share <= 1:
            raise ConfigError(f"shard.cache_share must be in (0, 1], got {self.cache_share}")
        if self.max_pending <= 0:
            raise ConfigError(f"shard.max_pending must be > 0, got {self.max_pending}")
        if not self.wait_timeout_s > 0:
            raise ConfigError(f"shard.wait_timeout_s must be > 0, got {self.wait_timeout_s}")
        if self.scratch_bytes < 0:
            raise ConfigError(f"shard.scratch_bytes must be >= 0, got {self.scratch_bytes}")
        if self.max_rows_per_request <= 0:
            raise ConfigError(f"shard.max_rows_per_request must be > 0, got {self.max_rows_per_request}")


@dataclass
class _Table:
    """A table's owned partitions (resident and/or cached) with its optimizer."""

    spec: TableSpec
    parts: TieredPartitions
    owned: np.ndarray  # bool [NP]: partitions held here
    optimizer: SparseOptimizer
    store: TableStore | None = None  # writable home of the cached partitions (None: RAM only)


class Shard:
    """Owned partitions of some tables, served and updated (docs/internals.md "param_server/")."""

    def __init__(self, config: ShardConfig | None = None, shard_id: int = 0) -> None:
        self.config = config or ShardConfig()
        self.shard_id = shard_id
        warm_up()  # the compiled kernels loaded now, not by the first request (param_server/kernels.py)
        self._tables: dict[str, _Table] = {}
        self._scratch = ScratchPool(self.config.scratch_bytes)  # reused row-gradient buffers
        self._cond = threading.Condition()  # guards tables, clocks, frozen set, counters
        self._clocks = StepClocks()  # applied and queued steps per (worker, table) (param_server/clocks.py)
        self._frozen = np.zeros(0, dtype=bool)  # [NP] partitions being handed off: pushes wait
        self._budget_left = self.config.ram_budget_bytes  # RAM not yet given to a table (None: unbounded)
        self._counters = ShardCounters()
        self._log: UpdateLog | None = None  # durable record of admitted pushes (param_server/update_log.py)
        self._admitting = True  # False while a checkpoint cuts the log: pushes wait
        self._queue = ApplyQueue(self.config.max_pending, self._apply, name=f"shard-{shard_id}-apply")

    # --- tables ----------------------------------------------------------------------------------

    def add_table(self, spec: TableSpec, partitions: dict[int, dict[str, np.ndarray]]) -> None:
        """Hold `partitions` of a table in RAM: {p: {"values": [R, d_v], state name: [R, ...]}}.

        Missing state arrays start at 0. The arrays are copied into the shard's flat layout.
        """
        check_partition_arrays(spec, partitions)
        parts = TieredPartitions(spec, ResidentPartitions(spec, {int(p): a for p, a in partitions.items()}), None)
        self._install(spec, parts, None, partition_nbytes(spec) * len(partitions))

    def load_table(self, store: TableStore, partitions: Iterable[int], *, work_store: TableStore | None = None,
                   initialize: bool = False) -> None:
        """Hold `partitions` of the table in `store`: in RAM while they fit the budget, the rest cached.

        Args:
            store: where the partitions' state is read from (a checkpoint, the initial table).
            partitions: the partitions to own.
            work_store: a writable group of the same table that the chunk cache writes back into;
                default `store` itself. Cached partitions are copied there first when it differs.
            initialize: the partitions are new: resident ones are generated in RAM, cached ones are
                initialised in the work store (values seeded per partition, state 0; DESIGN §5).
        """
        spec, owned = store.spec, sorted({int(p) for p in partitions})
        home = work_store or store
        if home.spec != spec:
            raise InvalidRequestError(f"work store {home.path} holds {home.spec}, not {spec}")
        plan = plan_tiers(spec, owned, self._budget_left, min_cache=min_cache_bytes(home),
                          cache_share=self.config.cache_share)
        for p in plan.cached:
            if initialize:
                home.initialize_partitions([p])
                zero_state(home, p)
            elif home is not store:
                copy_partition(store, home, p)
        resident = ResidentPartitions(spec, slots=len(plan.resident))  # one partition in flight at a time
        for p in plan.resident:
            resident.add(p, initial_arrays(spec, p) if initialize else store.read_partition(p))
        cached = CachedTablePartitions(home, plan.cached, plan.cache_bytes) if plan.cached else None
        self._install(spec, TieredPartitions(spec, resident, cached), home if cached else work_store, plan.used_bytes)

    def _install(self, spec: TableSpec, parts: TieredPartitions, store: TableStore | None, used: int) -> None:
        owned = np.zeros(spec.num_partitions, dtype=bool)
        owned[list(parts.partitions)] = True
        table = _Table(spec, parts, owned, make_optimizer(SparseOptimizerConfig.from_spec(spec)), store)
        with self._cond:
            if spec.name in self._tables:
                raise InvalidRequestError(f"shard {self.shard_id} already holds table {spec.name!r}")
            self._tables[spec.name] = table
            if self._frozen.size < spec.num_partitions:
                self._frozen = np.zeros(spec.num_partitions, dtype=bool)
            if self._budget_left is not None:
                self._budget_left = max(0, self._budget_left - used)
        logger.info("shard %s holds table %s: %d partitions resident, %d cached, %d bytes in RAM", self.shard_id,
                    spec.name, len(parts.resident.partitions), len(parts.partitions) - len(parts.resident.partitions),
                    parts.resident_bytes())

    def table_names(self) -> list[str]:
        """Names of the tables this shard holds."""
        with self._cond:
            return sorted(self._tables)

    def spec(self, table: str) -> TableSpec:
        """The spec of a held table."""
        return self._table(table).spec

    def owned_partitions(self, table: str) -> list[int]:
        """Partitions of `table` held here, ascending."""
        t = self._table(table)
        with self._cond:
            return np.flatnonzero(t.owned).tolist()

    def cached_partitions(self, table: str) -> list[int]:
        """Partitions of `table` served through the chunk cache, ascending."""
        t = self._table(table)
        with self._cond:
            return list(t.parts.cached.partitions) if t.parts.cached is not None else []

    # --- lookups ---------------------------------------------------------------------------------

    def gather(
        self, table: str, rows: Any, *, worker_id: int = 0, min_step: int | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Values of `rows`: int64 [U] -> [U, d_v] in the table dtype (into `out` if given).

        Waits until `worker_id`'s applied step >= `min_step` when one is given (DESIGN §4.3).
        """
        t = self._table(table)
        rows = self._rows(t, rows, allow_empty=False)
        check_wait_args(worker_id, min_step)
        shape, dtype = (rows.shape[0], t.spec.dim), t.parts.resident.values.dtype
        if out is not None and (out.shape != shape or out.dtype != dtype):
            raise InvalidRequestError(f"out must be {dtype} {list(shape)}")
        with self._cond:
            self._wait_for_step(worker_id, table, min_step)
            self._check_owned(t, rows)  # a hand-off may have moved them while we waited
            values = t.parts.read(rows)
            self._counters.count_lookup(rows.shape[0])
        if out is None:
            return values
        np.copyto(out, values)
        return out

    def check_lookup(self, table: str, rows: Any) -> np.ndarray:
        """`rows` validated as `gather` would take them (int64 [U], not empty, within the request
        limit, in range, owned here), without reading anything: a streamed lookup is refused whole
        before its first answer."""
        return self._rows(self._table(table), rows, allow_empty=False)

    def pooled_gather(
        self, table: str, rows: Any, projector: Any, token: Any, scores: Any, num_projectors: int, *,
        worker_id: int = 0, min_step: int | None = None, pre_table: str | None = None, q_p: Any = None,
        tokens_touched: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pooled partial sums of this shard's rows (DESIGN §3.1 step 6, §4.2 PooledGather).

        rows/projector/token int64 [n], scores float32 [n, h], num_projectors = E ->
        (tokens touched, sorted unique int64 [Tt]; sums float32 [Tt, E, d_v]).

        With pre-values (DESIGN §3.3 item 3): `pre_table` names the pre-value table P_tab [P, d_p]
        of `table` (same rows and partitions), q_p float32 [Tq, d_p] is the projected query of each
        token of tokens_touched int64 [Tq] (sorted unique, holding every token), and entry j pools
        with the scores a_j * s_j, a_j = <q_p[token_j], P_tab[row_j]> (pooling.pre_value_scores).
        """
        t = self._table(table)
        rows, projector, token, scores = self._pooled_args(t, rows, projector, token, scores, num_projectors,
                                                           allow_empty=False)
        pre = self._pre_args(t, pre_table, q_p, tokens_touched, token)
        check_wait_args(worker_id, min_step)
        with self._cond:
            self._wait_for_step(worker_id, table, min_step)
            self._check_owned(t, rows)
            self._counters.count_lookup(rows.shape[0])
            if pre is not None:
                t_pre, q, q_pos = pre
                self._check_owned(t_pre, rows)
                p_table, p_flat = self._rows_of(t_pre, rows)
                _, scores = pre_value_scores(p_table, q, q_pos, scores, flat=p_flat)  # s' = a * s, (n, h)
            source = t.parts.source(rows)
            if source is not None:  # all resident: pool straight from the table, under the lock
                return pooled_sum(source[0], projector, token, scores, int(num_projectors), flat=source[1])
            v, flat = self._distinct_rows(t, rows)  # [U, d_v], [n]
        return pooled_sum(v, projector, token, scores, int(num_projectors), flat=flat)

    # --- updates ---------------------------------------------------------------------------------

    def push(self, table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any, grads: Any) -> bool:
        """Queue a gradient push: rows int64 [U] (may repeat), grads [U, d_v].

        Returns False for a duplicate seq (acknowledged, dropped). An empty push is valid and only
        advances the worker's step. Raises QueueFullError (nothing queued) when the queue is full.
        """
        self._check_writable()
        t = self._table(table)
        worker_id, seq, step, lr = push_header(worker_id, seq, step, lr)
        rows = self._rows(t, rows, allow_empty=True)
        if rows.shape[0] == 0 and np.shape(grads) == (0,):
            grads = np.zeros((0, t.spec.dim), dtype=np.float32)
        g = floats("grads", grads, (rows.shape[0], t.spec.dim))
        g = np.array(g, dtype=np.float32, copy=True)  # the queue owns its copy
        return self._admit(t, PendingUpdate(table, worker_id, seq, step, lr, rows, g))

    def pooled_backward(
        self, table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any, projector: Any,
        token: Any, scores: Any, grad_out: Any, tokens_touched: Any, num_projectors: int, *,
        min_step: int | None = None,
    ) -> np.ndarray:
        """dL/ds float32 [n, h] from the current values; queues the row update (see below)."""
        return self.pooled_backward_with_ack(table, worker_id, seq, step, lr, rows, projector, token, scores,
                                             grad_out, tokens_touched, num_projectors, min_step=min_step)[0]

    def pooled_backward_with_ack(
        self, table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any, projector: Any,
        token: Any, scores: Any, grad_out: Any, tokens_touched: Any, num_projectors: int, *,
        min_step: int | None = None,
    ) -> tuple[np.ndarray, bool]:
        """Backward of `pooled_gather` (DESIGN §4.2 PooledBackward).

        rows/projector/token int64 [n], scores float32 [n, h], grad_out float32 [Tt, E, d_v] = dL/do
        for tokens_touched int64 [Tt] (sorted unique, holding every token) ->
        (dL/ds float32 [n, h], accepted). dL/ds[j, c] = <dL/do[t_j, p_j, slice c], V[row_j, slice c]>
        with V as it is now; the update dL/dV[row_j, slice c] = s_c[j] * dL/do[t_j, p_j, slice c] is
        queued like a push (accepted False: a duplicate seq, dropped, dL/ds still answered).
        `min_step` makes V wait for the worker's earlier pushes as a lookup's would (DESIGN §4.3): a
        backward right after another push of the same rows reads the values that push left.
        """
        grad_scores, _, accepted = self._pooled_backward(
            table, worker_id, seq, step, lr, rows, projector, token, scores, grad_out, tokens_touched,
            num_projectors, min_step=min_step)
        return grad_scores, accepted

    def pooled_backward_pre(
        self, table: str, pre_table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any,
        projector: Any, token: Any, scores: Any, q_p: Any, grad_out: Any, tokens_touched: Any,
        num_projectors: int, *, min_step: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Backward of `pooled_gather` with pre-values (DESIGN §3.3 item 3).

        As `pooled_backward_with_ack`, plus `pre_table` (P_tab of `table`) and q_p float32 [Tt, d_p]
        (the projected query of each token of tokens_touched) -> (dL/ds float32 [n, h], dL/dq_p float32
        [Tt, d_p], accepted). With s' = a * s and dL/ds' as in `pooled_backward_with_ack` (V and
        P_tab as they are now): dL/ds = a * dL/ds', dL/dq_p[t] = sum_{j: token_j = t} g_j * P_tab[row_j],
        g_j = <s_j, dL/ds'_j>. One update of both tables is queued under `seq` (the same optimizer
        and LR for both): dL/dV[row_j, slice c] = s'_c[j] * dL/do[t_j, p_j, slice c] and
        dL/dP_tab[row_j] = g_j * q_p[t_j].
        """
        grad_scores, grad_q, accepted = self._pooled_backward(
            table, worker_id, seq, step, lr, rows, projector, token, scores, grad_out, tokens_touched,
            num_projectors, min_step=min_step, pre_table=pre_table, q_p=q_p)
        assert grad_q is not None
        return grad_scores, grad_q, accepted

    def _pooled_backward(
        self, table: str, worker_id: int, seq: int, step: int, lr: float, rows: Any, projector: Any,
        token: Any, scores: Any, grad_out: Any, tokens_touched: Any, num_projectors: int, *,
        min_step: int | None, pre_table: str | None = None, q_p: Any = None,
    ) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """Check everything, then read V (and P_tab), compute the gradients and queue the update."""
        self._check_writable()
        t = self._table(table)
        worker_id, seq, step, lr = push_header(worker_id, seq, step, lr)
        rows, projector, token, scores = self._pooled_args(t, rows, projector, token, scores, num_projectors,
                                                           allow_empty=True)
        e, d_v = int(num_projectors), t.spec.dim
        touched = ids("tokens_touched", tokens_touched)
        if touched.shape[0] > 1 and not np.all(touched[1:] > touched[:-1]):
            raise InvalidRequestError("tokens_touched must be sorted and unique")
        g_out = floats("grad_out", grad_out, (touched.shape[0], e, d_v))
        pre = self._pre_args(t, pre_table, q_p, touched, token) if pre_table is not None or q_p is not None else None
        check_wait_args(worker_id, min_step)
        t_pos = positions_in(touched, token, "every token must appear in tokens_touched")  # [n]
        pre_result = p_source = None
        with self._cond:
            self._wait_for_step(worker_id, table, min_step)
            self._wait_unfrozen(t, rows)
            source = t.parts.source(rows)  # all resident: V read in the table itself, under the lock
            if pre is not None:
                t_pre, q, q_pos = pre
                self._check_owned(t_pre, rows)
                # P_tab in place too when V is (both backwards then run under the lock), else its rows
                p_source = t_pre.parts.source(rows) if source is not None else None
                p_table, p_flat = p_source if p_source is not None else self._distinct_rows(t_pre, rows)
                a, scores_v = pre_value_scores(p_table, q, q_pos, scores, flat=p_flat)  # s' = a * s for V
            else:
                scores_v = scores
            if source is not None:
                result = pooled_backward(source[0], rows, projector, t_pos, scores_v, g_out, flat=source[1],
                                         rows_out=self._scratch.empty)
                if p_source is not None:
                    pre_result = pre_value_backward(p_table, q, q_pos, rows, scores, a, result[0], flat=p_flat)
            else:
                v, v_flat = self._distinct_rows(t, rows)  # [U, d_v], [n]
        if source is None:
            result = pooled_backward(v, rows, projector, t_pos, scores_v, g_out, flat=v_flat,
                                     rows_out=self._scratch.empty)
        grad_pooled, unique, summed = result
        if pre is None:
            return grad_pooled, None, self._admit(t, PendingUpdate(table, worker_id, seq, step, lr, unique, summed))
        if pre_result is None:  # P_tab's rows were copied under the lock
            pre_result = pre_value_backward(p_table, q, q_pos, rows, scores, a, grad_pooled, flat=p_flat)
        grad_scores, grad_q, pre_unique, pre_summed = pre_result
        update = PendingUpdate(table, worker_id, seq, step, lr, unique, summed,
                               also=((t_pre.spec.name, pre_unique, pre_summed),))
        return grad_scores, grad_q, self._admit(t, update)

    def _admit(self, t: _Table, update: PendingUpdate) -> bool:
        """Queue a validated update once its partitions are not being handed off; count it pending."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._admitting, self.config.wait_timeout_s):
                raise WaitTimeoutError(f"shard {self.shard_id}: a checkpoint held pushes back for "
                                       f"{self.config.wait_timeout_s} s")
            self._wait_unfrozen(t, update.slots)
            self._log_admitted(update)
            names = [name for name, _, _ in update.parts()]
            for name in names:
                self._clocks.queue(update.worker_id, name, update.step)
            accepted = False
            try:
                accepted = self._queue.submit(update)
            finally:
                if not accepted:
                    for name in names:
                        self._clocks.unqueue(update.worker_id, name, update.step)
        return accepted

    def _log_admitted(self, update: PendingUpdate) -> None:
        """With self._cond held: append a push the queue is about to accept to the update log, before
        it is queued and acknowledged (a duplicate or a push refused as queue-full is not logged)."""
        if self._log is None or update.seq <= self._queue.last_seq(update.worker_id):
            return
        if self._queue.depth() >= self._queue.max_pending:  # submit will refuse it; only _admit submits
            return
        for name, slots, grads in update.parts():  # one record per table, the same seq (see `replay`)
            self._log.append(LogRecord(name, update.worker_id, update.seq, update.step, update.lr, slots, grads))

    def attach_log(self, log: UpdateLog | None) -> None:
        """Record every push admitted from now on in `log` before it is acknowledged (None: stop)."""
        with self._cond:
            self._log = log

    def replay(self, records: Iterable[LogRecord]) -> int:
        """Apply logged pushes again, in order, after a restart from a checkpoint; returns how many were
        admitted (a seq already accepted is dropped: exactly once). Rows of partitions not owned here
        (moved away by a rescale) are skipped. Call before attaching the log and serving."""
        admitted = 0
        for group in _same_seq_groups(records):  # a value push and its pre-value push: one update
            kept = []
            for rec in group:
                t = self._tables.get(rec.table)
                if t is not None:
                    keep = t.owned[rec.rows % t.spec.num_partitions]
                    kept.append((rec.table, rec.rows[keep], rec.grads[keep]))
            if not kept:
                continue
            rec = group[0]
            t = self._tables[kept[0][0]]
            update = PendingUpdate(kept[0][0], rec.worker_id, rec.seq, rec.step, rec.lr, kept[0][1], kept[0][2],
                                   also=tuple(kept[1:]))
            while True:
                try:
                    admitted += self._admit(t, update)
                    break
                except QueueFullError:
                    self.drain()
        self.drain()
        return admitted

    def _apply(self, update: PendingUpdate) -> None:
        """Apply one push on the apply thread: duplicates summed, one optimizer step per row."""
        cpu0 = time.thread_time()
        parts = [(self._tables[name], *sum_duplicates(slots, grads)) for name, slots, grads in update.parts()]
        with self._cond:  # every table of the update under one hold: no lookup sees half of it
            try:
                for t, rows, grads in parts:  # global rows, unique
                    t.parts.step(t.optimizer, rows, grads, update.lr)
            finally:  # advance the clocks even if a bug raised, so lookups never hang on them
                for t, _, _ in parts:
                    self._clocks.applied(update.worker_id, t.spec.name, update.step, update.seq)
                self._counters.count_apply(parts[0][1].shape[0], time.thread_time() - cpu0)
                self._cond.notify_all()

    # --- hand-off of partitions (rescaling, DESIGN §4.1) -----------------------------------------

    def freeze(self, partitions: Iterable[int]) -> None:
        """Pause pushes touching `partitions` (they wait until `release` or `unfreeze`); reads go on."""
        with self._cond:
            self._frozen[list(partitions)] = True

    def unfreeze(self, partitions: Iterable[int]) -> None:
        """Let paused pushes through again (an aborted hand-off)."""
        with self._cond:
            self._frozen[list(partitions)] = False
            self._cond.notify_all()

    def handoff_export(self, partitions: Iterable[int]) -> dict[str, dict[int, Arrays]]:
        """Frozen partitions' state after a drain: {table: {p: arrays}} (cached ones flushed to the store)."""
        ps = sorted({int(p) for p in partitions})
        with self._cond:
            if not self._frozen[ps].all():
                raise InvalidRequestError(f"partitions {ps} must be frozen before they are exported")
        self.drain()
        with self._cond:
            out = {}
            for name, t in self._tables.items():
                if not t.owned[ps].all():
                    raise WrongShardError(f"shard {self.shard_id} does not own all of {ps} of {name}")
                out[name] = {p: t.parts.export(p) for p in ps}
            return out

    def release(self, partitions: Iterable[int]) -> None:
        """Drop handed-off partitions; pushes paused on them now fail with WrongShardError."""
        ps = sorted({int(p) for p in partitions})
        each = 0
        with self._cond:
            for t in self._tables.values():
                for p in ps:
                    if t.owned[p]:
                        if not t.parts.is_cached(p):
                            each += partition_nbytes(t.spec)
                        t.parts.remove(p)
                        t.owned[p] = False
            self._frozen[ps] = False
            if self._budget_left is not None:
                self._budget_left += each
            self._cond.notify_all()
        logger.info("shard %s released partitions %s", self.shard_id, ps)

    def adopt(self, tables: dict[str, dict[int, Arrays | None]]) -> None:
        """Take over partitions another shard handed off: {table: {p: arrays}} (held but not yet routed
        here until the new map is installed). RAM while the budget has room, else the chunk cache;
        arrays None = the partition's state is already in this table's work store (a shared store)."""
        with self._cond:
            for name, parts in tables.items():
                t = self._table(name)
                check_partition_arrays(t.spec, {p: a for p, a in parts.items() if a is not None})
                for p, arrays in sorted(parts.items()):
                    if t.owned[p]:
                        raise InvalidRequestError(f"shard {self.shard_id} already owns partition {p} of {name}")
                    each = partition_nbytes(t.spec)
                    in_ram = arrays is not None and (self._budget_left is None or each <= self._budget_left)
                    if not in_ram and t.parts.cached is None:
                        self._open_cache(t)
                    t.parts.add(p, arrays, cached=not in_ram)
                    t.owned[p] = True
                    if in_ram and self._budget_left is not None:
                        self._budget_left -= each

    def _open_cache(self, t: _Table) -> None:
        """Give a table that was all resident a chunk cache (the rest of the budget, at least one chunk)."""
        if t.store is None:
            raise InvalidRequestError(f"table {t.spec.name} has no work store to cache partitions in")
        size = max(min_cache_bytes(t.store), self._budget_left or 0)
        t.parts.cached = CachedTablePartitions(t.store, [], size)
        if self._budget_left is not None:
            self._budget_left = max(0, self._budget_left - size)
        logger.info("shard %s: table %s now caches partitions in %d bytes", self.shard_id, t.spec.name, size)

    def work_store_path(self, table: str) -> str | None:
        """Path of the table group the chunk cache writes back into (None: no cache)."""
        t = self._table(table)
        return str(t.store.path) if t.store is not None and t.parts.cached is not None else None

    def clocks(self) -> list[tuple[int, str, int]]:
        """Applied-step clocks [(worker, table, step)] (they travel with handed-off partitions)."""
        with self._cond:
            return self._clocks.items()

    def merge_clocks(self, clocks: Iterable[tuple[int, str, int]]) -> None:
        """Start clocks this shard has never seen at the previous owner's value; keep the others.

        A shard that already has a worker's clock keeps it: that worker still pushes every step to
        it, so a lower clock only makes a lookup wait for a push that is on its way.
        """
        with self._cond:
            self._clocks.merge(clocks)
            self._cond.notify_all()

    # --- clocks, drain, checkpoint ---------------------------------------------------------------

    def progress(self) -> dict[str, list]:
        """What this shard has taken in, per worker, as JSON-able lists: `applied_step` [[worker, table,
        step]] and `last_seq` [[worker, seq]]. `save` returns it as of the state it writes."""
        with self._cond:
            return {"applied_step": [list(c) for c in self._clocks.items()],
                    "last_seq": [[w, self._queue.last_seq(w)] for w in self._clocks.workers()]}

    def restore_progress(self, progress: dict[str, list]) -> None:
        """After Ray restarted this shard from a checkpoint (before `replay`): the workers go on with
        their seq numbering and lookups wait on their clocks, so both resume where the checkpoint cut
        them. Without this a lookup's min_step could wait for pushes the checkpoint already holds."""
        clocks = [(int(w), str(name), int(s)) for w, name, s in progress.get("applied_step", [])]
        seqs = [(int(w), int(q)) for w, q in progress.get("last_seq", [])]
        with self._cond:
            self._clocks.restore(clocks, seqs)
            for w, q in seqs:
                self._queue.restore_last_seq(w, q)
            self._cond.notify_all()

    def applied_step(self, worker_id: int, table: str | None = None) -> int:
        """The highest step of `worker_id` whose push to `table` has been applied (-1 if none).

        With no table: the lowest such step over the tables this worker has pushed to.
        """
        with self._cond:
            return self._clocks.step(worker_id, table)

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
        with self._cond:
            return {p: t.parts.export(p) for p in t.parts.partitions}

    def save(self, root_of_tables: Path | str, *, cut: Callable[[], None] | None = None) -> dict[str, list]:
        """Drain, then write every owned partition into the existing groups `root_of_tables/<table>`
        (cached partitions: flushed, then copied chunk by chunk); returns `progress()` at that state.

        No push is admitted from the drain until the partitions are written; `cut` runs after the
        drain, so the update log can start a new segment exactly at the state being saved.
        """
        root = Path(root_of_tables)
        with self._cond:
            self._admitting = False
        try:
            self.drain()
            if cut is not None:
                cut()
            progress = self.progress()
            for name in self.table_names():
                t = self._table(name)
                store = open_table(root / name, "r+")
                if store.spec != t.spec:
                    raise InvalidRequestError(f"table group {root / name} has spec {store.spec}, shard holds {t.spec}")
                with self._cond:
                    t.parts.save(store)
        finally:
            with self._cond:
                self._admitting = True
                self._cond.notify_all()
        logger.info("shard %s saved %s into %s", self.shard_id, self.table_names(), root)
        return progress

    def flush(self) -> None:
        """Drain, then write every dirty cached chunk back to its store."""
        self.drain()
        with self._cond:
            for t in self._tables.values():
                t.parts.flush()

    def metrics(self) -> dict[str, float]:
        """Counters and gauges: lookups, rows, pushes, queue depth, applied steps, bytes in RAM, and the
        chunk cache (bytes, hit rate, evictions, dirty chunks) summed over tables."""
        with self._cond:
            out = self._counters.as_dict()
            out["bytes_resident"] = float(sum(t.parts.resident.resident_bytes() for t in self._tables.values()))
            sums: dict[str, float] = {}
            for t in self._tables.values():
                for k, v in t.parts.metrics().items():
                    sums[k] = sums.get(k, 0.0) + v
            hits, misses = sums.get("cache_hits", 0.0), sums.get("cache_misses", 0.0)
            out.update(cache_bytes=sums.get("cache_bytes", 0.0), cache_budget_bytes=sums.get("cache_budget_bytes", 0.0),
                       cache_hits=hits, cache_misses=misses,
                       cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                       cache_evictions=sums.get("cache_evictions", 0.0),
                       cache_dirty_chunks=sums.get("cache_dirty_chunks", 0.0),
                       cache_writebacks=sums.get("cache_writebacks", 0.0),
                       resident_partitions=sums.get("resident_partitions", 0.0),
                       cached_partitions=sums.get("cached_partitions", 0.0))
            # the two cache levels (hot rows, chunks) and their I/O, summed; the row hit rate recomputed
            out.update({k: v for k, v in sums.items()
                        if k.startswith(("cache_row_", "cache_io_", "cache_chunk_", "cache_bytes_"))})
            row_hits, row_misses = sums.get("cache_row_hits", 0.0), sums.get("cache_row_misses", 0.0)
            out["cache_row_hit_rate"] = row_hits / (row_hits + row_misses) if row_hits + row_misses else 0.0
            for w, name, s in self._clocks.items():
                out[f"applied_step.worker.{w}.{name}"] = float(s)
        q = self._queue
        out.update(queue_depth=float(q.depth()), pushes_accepted=float(q.accepted),
                   pushes_duplicate=float(q.duplicates), queue_full_rejections=float(q.rejected_full),
                   apply_errors=float(q.apply_errors))
        return out

    def close(self) -> None:
        """Refuse new pushes, apply the queued ones, stop the apply thread, write the cache back and
        release its open chunk files."""
        self._queue.close()
        with self._cond:
            for t in self._tables.values():
                t.parts.close()  # a read-only cache writes nothing back

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

    def _check_owned(self, t: _Table, rows: np.ndarray) -> None:
        """With self._cond held: every row's partition is owned here (WrongShardError if not)."""
        if t.owned.all():  # (a shard holding the whole table: no per-row work)
            return
        part = partition_of_valid(rows, t.spec.num_partitions)
        if rows.shape[0] and not t.owned[part].all():
            missing = np.unique(part[~t.owned[part]])[:8].tolist()
            raise WrongShardError(f"shard {self.shard_id} does not own partitions {missing} of {t.spec.name}")

    def _wait_unfrozen(self, t: _Table, rows: np.ndarray) -> None:
        """With self._cond held: wait while a row's partition is being handed off, then check ownership."""
        part = partition_of_valid(rows, t.spec.num_partitions) if self._frozen.any() else None
        if part is not None and self._frozen[part].any():
            self._counters.requests_waiting_handoff += 1
            try:
                unfrozen = self._cond.wait_for(lambda: not self._frozen[part].any(), self.config.wait_timeout_s)
            finally:
                self._counters.requests_waiting_handoff -= 1
        else:
            unfrozen = True
        if not unfrozen:
            raise WaitTimeoutError(f"partitions of shard {self.shard_id} stayed frozen for "
                                   f"{self.config.wait_timeout_s} s (a hand-off did not finish)")
        self._check_owned(t, rows)

    def _rows(self, t: _Table, rows: Any, *, allow_empty: bool) -> np.ndarray:
        """Validated global rows int64 [n]: in range and owned here."""
        rows = ids("rows", rows)
        n = rows.shape[0]
        if n == 0 and not allow_empty:
            raise InvalidRequestError("empty lookup: rows must hold at least one row")
        if n > self.config.max_rows_per_request:
            raise RequestTooLargeError(f"{n} rows > max_rows_per_request {self.config.max_rows_per_request}")
        if n and (rows.min() < 0 or rows.max() >= t.spec.rows):
            raise InvalidRequestError(f"rows must be in [0, {t.spec.rows}) for table {t.spec.name}")
        self._check_owned(t, rows)
        return rows

    def _pooled_args(
        self, t: _Table, rows: Any, projector: Any, token: Any, scores: Any, num_projectors: Any, *,
        allow_empty: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validated (rows [n], projector [n], token [n], scores float32 [n, h]); the pooled answer
        [Tt, E, d_v] may hold at most max_rows_per_request rows of d_v (Tt <= n, and Tt <= the span
        of the token ids)."""
        rows = self._rows(t, rows, allow_empty=allow_empty)
        projector, token, scores = pooled_entries(rows.shape[0], projector, token, scores, num_projectors,
                                                  t.spec.dim)
        if token.shape[0]:
            touched = min(token.shape[0], int(token.max()) - int(token.min()) + 1)
            if touched * int(num_projectors) > self.config.max_rows_per_request:
                raise RequestTooLargeError(f"the pooled answer would hold up to {touched} tokens x "
                                           f"{int(num_projectors)} projectors > max_rows_per_request "
                                           f"{self.config.max_rows_per_request} rows")
        return rows, projector, token, scores

    @staticmethod
    def _rows_of(t: _Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(table, flat): what the pooling functions read entry j's row of t from (table[flat[j]]),
        with self._cond held: the table itself when all of `rows` are resident, else `_distinct_rows`."""
        source = t.parts.source(rows)
        return source if source is not None else Shard._distinct_rows(t, rows)

    @staticmethod
    def _distinct_rows(t: _Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a float32 copy of each distinct row of `rows` once [U, d], each entry's position in it [n]),
        with self._cond held. A pooled call repeats rows: reading each once spares the cache's lookups
        of the repeats and the [n, d] copy that expanding them made. The copy is in the kernels' dtype
        (a bfloat16 table's rows converted here, once), so the pooling functions read it as it is."""
        unique, inverse = unique_inverse(rows)
        return np.ascontiguousarray(t.parts.read(unique), dtype=np.float32), inverse

    def _pre_args(self, t: _Table, pre_table: str | None, q_p: Any, tokens_touched: Any, token: np.ndarray
                  ) -> tuple[_Table, np.ndarray, np.ndarray] | None:
        """Validated pre-value inputs of a pooled request (None: none given): (the P_tab table,
        q_p float32 [Tq, d_p], each entry's row of q_p int64 [n])."""
        if pre_table is None and q_p is None and tokens_touched is None:
            return None
        if not pre_table or q_p is None or tokens_touched is None:
            raise InvalidRequestError("pre-values need pre_table, q_p and tokens_touched together "
                                      f"(got pre_table={pre_table!r}, q_p {'set' if q_p is not None else 'unset'}, "
                                      f"tokens_touched {'set' if tokens_touched is not None else 'unset'})")
        t_pre = self._tables.get(pre_table)
        if t_pre is None:
            raise UnknownTableError(f"shard {self.shard_id} holds no pre-value table {pre_table!r} for "
                                    f"{t.spec.name!r}: the table has no pre-values here")
        sp, sv = t_pre.spec, t.spec
        if pre_table == sv.name or (sp.rows, sp.num_partitions) != (sv.rows, sv.num_partitions):
            raise InvalidRequestError(f"{pre_table!r} is not a pre-value table of {sv.name!r}: it needs the same "
                                      f"rows and partitions ({sp.rows}/{sp.num_partitions} vs "
                                      f"{sv.rows}/{sv.num_partitions}) and another name")
        touched = ids("tokens_touched", tokens_touched)
        if touched.shape[0] > 1 and not np.all(touched[1:] > touched[:-1]):
            raise InvalidRequestError("tokens_touched must be sorted and unique")
        q = np.asarray(q_p)
        if q.dtype != np.float32:
            raise InvalidRequestError(f"q_p must be float32, got {q.dtype}")
        q = floats("q_p", q, (touched.shape[0], sp.dim))  # wrong d_p or a NaN: refused here
        q_pos = positions_in(touched, token, "every token must appear in tokens_touched (q_p has one row per token)")
        return t_pre, q, q_pos

    def _wait_for_step(self, worker_id: int, table: str, min_step: int | None) -> None:
        """With self._cond held: wait until the worker's applied step on `table` >= min_step and no
        queued push of the worker at a step <= min_step is left (a re-routed push may arrive after a
        later one was applied, DESIGN §4.1)."""
        if min_step is None or self._clocks.reached(worker_id, table, min_step):
            return
        counters = self._counters

        def reached() -> bool:
            counters.wait_checks += 1
            return self._clocks.reached(worker_id, table, min_step)

        counters.lookups_waiting += 1
        try:
            ok = self._cond.wait_for(reached, self.config.wait_timeout_s)
        finally:
            counters.lookups_waiting -= 1
        if not ok:
            counters.wait_timeouts += 1
            raise WaitTimeoutError(
                f"worker {worker_id} step {min_step} not applied within {self.config.wait_timeout_s} s "
                f"on table {table} (applied: {self._clocks.step(worker_id, table)})"
            )
