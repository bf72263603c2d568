"""The parameter-server client: route, dedupe, fan out, reassemble (DESIGN §4.1-4.3).

`Client` is what workers and tools call. A lookup dedupes its rows (np.unique), routes each row to
its shard by the partition map (row r -> partition r % NP -> shard), cuts each shard's share into
~1 MB requests, keeps several in flight on several channels per shard (grpc futures), and writes
each answer straight into the output in request order. Lookups are idempotent, so they are retried
with deadlines; RESOURCE_EXHAUSTED (a full apply queue) is retried with exponential backoff.

Pushes are numbered per (worker, shard): seq 1, 2, 3, ... assigned when sent; a retried push
reuses its seq, so the shard applies it once. Every step sends one push to every shard (empty if
none of the rows live there), so a shard can answer `min_step` lookups. Pushes to one shard go
through one ordered sender thread (a shard drops a seq <= the last it accepted, so order matters).
A push split into chunks marks all but its last chunk with `step - 1` (-1 at step 0): a shard only
counts the step as applied once the whole push is. FAILED_PRECONDITION with a newer epoch
refreshes the map and re-routes. A shard that dies (UNAVAILABLE after the retries) is waited for:
a restarted shard comes back at a new address with the same partitions, and once a newer map names
it (installed by the driver with `install_map`, or fetched from the other shards) lookups re-run and
pushes go there in the same order, with the same seqs: the restarted shard has replayed what it
logged, so a push it had logged but not acknowledged is dropped as a duplicate (exactly once,
docs/reliability.md §6). Channels, deadlines, retries, TLS and the grouping of work per
shard live in `param_server.fanout`; the map and the address of each shard now in `param_server.routing`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from param_server import checks, fanout, wire
from param_server.errors import InvalidRequestError, StaleEpochError, UnknownTableError
from param_server.fanout import ClientConfig
from param_server.optimizers import sum_duplicates
from param_server.partition_map import PartitionMap
from param_server.routing import Routing
from protos.ultramem.v1 import memory_pb2 as pb

__all__ = ["Client", "ClientConfig", "TableMeta"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableMeta:
    """What the client needs to know about a table: P, d_v, NP."""

    rows: int
    dim: int
    num_partitions: int


def _chunk_step(step: int, index: int, count: int) -> int:
    """Step of chunk `index` of `count`: `step` for the last, `step - 1` before (-1 at step 0, which
    the shard accepts for this), so a min_step lookup waits for the whole push (DESIGN §4.3)."""
    return step if index == count - 1 else step - 1


def _ids(ids: np.ndarray) -> pb.Tensor:
    """Non-negative ids [n] as an INT32 tensor when they fit (half the bytes; shards accept INT32 and
    INT64 ids alike), else INT64. Pooled requests carry 3 ids per entry, so this is ~40% of them."""
    return wire.encode(ids, "int32" if ids.size == 0 or ids.max() < 2**31 else "int64")


def _backward_chunks(sel: np.ndarray, rows: np.ndarray, token: np.ndarray, per_entry: int, per_token: int,
                     budget: int) -> list[np.ndarray]:
    """Cut one shard's entries `sel` [k] (sorted by row) into PooledBackward requests of at most
    ~`budget` bytes (entries + dL/do of the tokens they touch), never splitting a row's entries, so each
    row gets one optimizer step per step. Halves at a row boundary until each piece fits."""
    out, todo = [], [sel]
    while todo:
        part = todo.pop()
        size = part.size * per_entry + np.unique(token[part]).size * per_token
        starts = np.flatnonzero(np.diff(rows[part])) + 1  # row boundaries inside the piece
        if size <= budget or starts.size == 0:
            out.append(part)
            continue
        cut = starts[starts.size // 2]
        todo += [part[cut:], part[:cut]]  # the left half is popped first: pieces stay in row order
    return out


class Client:
    """Talks to all shards of a table set; sync facade, concurrent fan-out inside."""

    def __init__(self, addresses: Sequence[str], *, partition_map: PartitionMap | None = None,
                 worker_id: int = 0, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self.worker_id = worker_id
        self._net = fanout.ShardChannels(self.config)
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}  # shard key -> last seq sent (key: the shard's first address)
        self._outstanding: list[tuple[Future, str, float, int]] = []
        self._tables: dict[str, TableMeta] = {}
        self._applied: dict[str, int] = {}  # table -> lowest applied_step any shard reported last lookup
        for address in addresses:
            self._net.open(address)
        self._routing = Routing(self._net, self.config, partition_map or self._map_from_info(list(addresses)))

    @classmethod
    def connect(cls, address: str, **kw: Any) -> Client:
        """Bootstrap from one shard: ask it for the partition map, then dial every shard in it."""
        net = fanout.ShardChannels(kw.get("config") or ClientConfig())
        try:
            pmap = fanout.map_from_proto(net.unary(address, "GetPartitionMap", pb.GetPartitionMapRequest()))
        finally:
            net.close()
        return cls(list(pmap.addresses), partition_map=pmap, **kw)

    # -- public API ----------------------------------------------------------------------------
    @property
    def partition_map(self) -> PartitionMap:
        """The map requests are routed with now."""
        return self._routing.pmap

    def install_map(self, new: PartitionMap) -> bool:
        """Route by `new` if its epoch is newer than ours; returns whether it was installed (a shard
        that moved to a new address with the same partitions is followed: `Routing.install`)."""
        return self._routing.install(new)

    def table(self, table: str) -> TableMeta:
        """P, d_v and NP of `table` (asked from the shards once)."""
        if table not in self._tables:
            self.info()
        if table not in self._tables:
            raise UnknownTableError(f"no shard serves table {table!r} (known: {sorted(self._tables)})")
        return self._tables[table]

    def gather(self, table: str, rows: np.ndarray, *, min_step: int | None = None,
               wire_dtype: str = "float32", out: np.ndarray | None = None) -> np.ndarray:
        """rows int64 [N], may repeat -> float32 [N, d_v] in request order.

        `out`, a C-contiguous float32 [N, d_v] buffer, is filled and returned when given: reusing
        it avoids page-faulting a fresh buffer on every call (DESIGN §8).
        """
        meta = self.table(table)
        rows = self._rows(rows, meta)
        wire.dtype_enum(wire_dtype)
        if out is not None and (out.shape != (rows.size, meta.dim) or out.dtype != np.float32
                                or not out.flags.c_contiguous):
            raise InvalidRequestError(f"out must be a C-contiguous float32 [{rows.size}, {meta.dim}] array")
        return self._routing.rerouting(lambda: self._gather_once(table, meta, rows, min_step, wire_dtype, out))

    def pooled_gather(self, table: str, rows: np.ndarray, projector: np.ndarray, token: np.ndarray,
                      scores: np.ndarray, num_tokens: int, num_projectors: int, *,
                      min_step: int | None = None, wire_dtype: str = "float32", pre_table: str | None = None,
                      q_p: np.ndarray | None = None) -> np.ndarray:
        """rows/projector/token int64 [n], scores float32 [n, h] -> float32 [T, E, d_v] (DESIGN §3.1 step 6).

        With pre-values (DESIGN §3.3): `pre_table` names P_tab of `table` and q_p float32 [T, d_p] is
        each token's projected query; the shards weigh entry j by <q_p[token_j], P_tab[row_j]>.
        """
        meta = self.table(table)
        rows, projector, token, scores = self._pooled_inputs(meta, rows, projector, token, scores, num_tokens)
        pre = self._pre_inputs(pre_table, q_p, num_tokens)
        return self._routing.rerouting(lambda: self._pooled_once(
            table, meta, rows, projector, token, scores, num_tokens, num_projectors, min_step, wire_dtype, pre))

    def push(self, table: str, rows: np.ndarray, grads: np.ndarray, *, lr: float, step: int,
             wait: bool = True) -> None:
        """Queue rows int64 [N] (may repeat; summed here) and grads [N, d_v] on their shards.

        One numbered push goes to every shard (empty where no row lives). wait=True returns once
        every shard has queued its part; wait=False returns at once (see `flush`).
        """
        meta = self.table(table)
        rows = self._rows(rows, meta)
        grads = np.asarray(grads, dtype=np.float32)
        if grads.shape != (rows.size, meta.dim):
            raise InvalidRequestError(f"grads must be [{rows.size}, {meta.dim}], got {list(grads.shape)}")
        if rows.size:
            rows, grads = sum_duplicates(rows, grads)
        futures = self._submit_push(table, meta, rows, grads, lr, step)
        if wait:
            self._finish_pushes(table, meta, futures, lr, step)
        else:
            with self._lock:
                self._outstanding.extend((f, table, lr, step) for f in futures)

    def flush(self) -> None:
        """Wait for every outstanding push (re-routing any a map change bounced)."""
        with self._lock:
            pending, self._outstanding = self._outstanding, []
        by_push: dict[tuple[str, float, int], list[Future]] = {}
        for fut, table, lr, step in pending:
            by_push.setdefault((table, lr, step), []).append(fut)
        for (table, lr, step), futures in by_push.items():
            self._finish_pushes(table, self.table(table), futures, lr, step)

    def pooled_backward(self, table: str, rows: np.ndarray, projector: np.ndarray, token: np.ndarray,
                        scores: np.ndarray, grad_out: np.ndarray, *, lr: float, step: int,
                        min_step: int | None = None) -> np.ndarray:
        """dL/do grad_out [T, E, d_v] -> dL/ds [n, h]; each shard also queues its rows' update.
        `min_step`: dL/ds uses the values after this worker's pushes up to min_step (as a lookup)."""
        meta, grad_out, (rows, projector, token, scores) = self._backward_inputs(table, rows, projector, token,
                                                                                  scores, grad_out)
        self.flush()  # its seqs must follow any earlier push
        return self._pooled_backward(table, meta, rows, projector, token, scores, grad_out, lr, step, min_step)[0]

    def pooled_backward_pre(self, table: str, pre_table: str, rows: np.ndarray, projector: np.ndarray,
                            token: np.ndarray, scores: np.ndarray, q_p: np.ndarray, grad_out: np.ndarray, *,
                            lr: float, step: int, min_step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`pooled_backward` with pre-values (DESIGN §3.3): q_p float32 [T, d_p] ->
        (dL/ds [n, h], dL/dq_p [T, d_p] summed over the shards); each shard queues the update of its
        rows of both `table` and `pre_table` under one seq."""
        meta, grad_out, (rows, projector, token, scores) = self._backward_inputs(table, rows, projector, token,
                                                                                  scores, grad_out)
        pre = self._pre_inputs(pre_table, q_p, grad_out.shape[0])
        self.flush()
        grad_scores, grad_q = self._pooled_backward(table, meta, rows, projector, token, scores, grad_out, lr, step,
                                                    min_step, pre)
        assert grad_q is not None
        return grad_scores, grad_q

    def info(self) -> list[dict]:
        """One dict per shard: shard_id, address, epoch, read_only, tables (with partitions), metrics."""
        out = []
        for address in self._routing.pmap.addresses:
            msg = self._net.unary(address, "Info", pb.InfoRequest())
            tables = {}
            for t in msg.tables:
                self._tables[t.name] = TableMeta(int(t.rows), int(t.dim), int(t.num_partitions))
                tables[t.name] = {"rows": t.rows, "dim": t.dim, "dtype": t.dtype, "optimizer": t.optimizer,
                                  "num_partitions": t.num_partitions, "partitions": list(t.partitions)}
            out.append({"address": address, "shard_id": msg.shard_id, "epoch": msg.epoch,
                        "read_only": msg.read_only, "tables": tables, "metrics": dict(msg.metrics)})
        return out

    def checkpoint(self, tables_dir: str) -> None:
        """Ask every shard to drain and write its partitions into `tables_dir` (table groups exist)."""
        self.flush()
        calls = [fanout.Call(a, "Checkpoint", pb.CheckpointRequest(tables_dir=str(tables_dir)), lambda r: None)
                 for a in self._routing.pmap.addresses]
        self._net.run(calls, frozenset({grpc.StatusCode.UNAVAILABLE}))

    def close(self) -> None:
        """Flush pushes, stop sender threads, close channels."""
        try:
            self.flush()
        finally:
            self._net.close()

    def __enter__(self) -> Client:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups -------------------------------------------------------------------------------
    def _gather_once(self, table: str, meta: TableMeta, rows: np.ndarray, min_step: int | None,
                     wire_dtype: str, out: np.ndarray | None) -> np.ndarray:
        pmap = self._routing.pmap
        repeats = checks.repeats_of(rows, meta.rows)
        out = np.empty((rows.size, meta.dim), dtype=np.float32) if out is None else out
        # all unique: the rows are asked for in the caller's order (within each shard), so each answer
        # lands in `out` at ascending positions (one block with one shard) instead of scattered ones
        keys = rows if repeats is None else repeats[0]
        target = out if repeats is None else np.empty((keys.size, meta.dim), np.float32)
        per_chunk = max(1, self.config.chunk_bytes // (meta.dim * wire.numpy_dtype(wire_dtype).itemsize))
        header = self._lookup_header(table, pmap.epoch, min_step)
        enum = wire.dtype_enum(wire_dtype)

        applied: list[int] = []

        def put(sel: np.ndarray, resp: bytes) -> None:  # a serialized GatherResponse for keys[sel]
            where: np.ndarray | slice = sel
            if sel.size and int(sel[-1]) - int(sel[0]) == sel.size - 1:  # consecutive: a block copy
                where = slice(int(sel[0]), int(sel[-1]) + 1)
            target[where] = wire.parse_tensor_field(resp, 1, "values", allowed=(wire_dtype,), ndim=2,
                                                    trailing=(sel.size, meta.dim))
            step = wire.parse_int_field(resp, 2)
            applied.append(-1 if step is None else step)

        def request(part: np.ndarray, per_answer: int = 0) -> pb.GatherRequest:
            return pb.GatherRequest(header=header, rows=wire.encode(keys[part], "int64"), wire_dtype=enum,
                                    rows_per_answer=per_answer)

        shards = fanout.by_shard(pmap, keys)
        if all(sel.size <= per_chunk for _, sel in shards):  # one answer per shard: plain calls
            self._net.run([fanout.Call(address, "Gather", request(sel), functools.partial(put, sel))
                           for address, sel in shards], fanout.LOOKUP_RETRY)
        else:
            per_call = per_chunk * self.config.stream_answers
            streams = []
            for address, sel in shards:
                for a, b in fanout.split(sel.size, per_call):
                    part = sel[a:b]
                    streams.append(fanout.StreamCall(
                        address, "GatherStream",
                        lambda done, part=part: request(part[done * per_chunk:], per_chunk),
                        -(-part.size // per_chunk),
                        lambda i, resp, part=part: put(part[i * per_chunk:(i + 1) * per_chunk], resp)))
            self._net.run_streams(streams, fanout.LOOKUP_RETRY)
        self._record_applied(table, applied)
        if repeats is not None:
            np.take(target, repeats[1], axis=0, out=out)
        return out

    def _pooled_once(self, table: str, meta: TableMeta, rows: np.ndarray, projector: np.ndarray,
                     token: np.ndarray, scores: np.ndarray, num_tokens: int, num_projectors: int,
                     min_step: int | None, wire_dtype: str, pre: tuple[str, np.ndarray] | None = None) -> np.ndarray:
        pmap = self._routing.pmap
        out = np.zeros((num_tokens, num_projectors, meta.dim), dtype=np.float32)
        header = self._lookup_header(table, pmap.epoch, min_step)
        per_token = num_projectors * meta.dim * wire.numpy_dtype(wire_dtype).itemsize
        max_tokens = max(1, self.config.chunk_bytes // per_token)

        applied: list[int] = []

        def done(resp: pb.PooledGatherResponse) -> None:
            tokens = wire.decode_ids(resp.tokens, "tokens")
            sums = wire.decode(resp.sums, "sums", allowed=(wire_dtype,), ndim=3,
                               trailing=(tokens.size, num_projectors, meta.dim))
            out[tokens] += sums  # tokens are unique within one answer
            applied.append(resp.applied_step)

        calls = []
        for address, sel in fanout.by_shard(pmap, rows, sort_by=token):
            for a, b in fanout.group_chunks(token[sel], max_tokens):
                if b > a:
                    part = sel[a:b]
                    req = pb.PooledGatherRequest(
                        header=header, rows=_ids(rows[part]), projector=_ids(projector[part]),
                        token=_ids(token[part]), scores=wire.encode(scores[part], "float32"),
                        num_projectors=num_projectors,
                        wire_dtype=wire.dtype_enum(wire_dtype))
                    if pre is not None:  # the projected queries of the tokens this request touches
                        touched = np.unique(token[part])
                        req.pre_table = pre[0]
                        req.q_p.CopyFrom(wire.encode(pre[1][touched], "float32"))
                        req.tokens_touched.CopyFrom(_ids(touched))
                    calls.append(fanout.Call(address, "PooledGather", req, done))
        self._net.run(fanout.interleave(calls), fanout.LOOKUP_RETRY)
        self._record_applied(table, applied)
        return out

    def _record_applied(self, table: str, applied: list[int]) -> None:
        if applied:
            self._applied[table] = min(applied)

    def applied_step(self, table: str) -> int | None:
        """This worker's newest step whose pushes every shard had applied when it answered the last
        lookup of `table` (-1: none yet; None: no lookup yet). Staleness = newest push - this."""
        return self._applied.get(table)

    # -- pushes --------------------------------------------------------------------------------
    def _submit_push(self, table: str, meta: TableMeta, rows: np.ndarray, grads: np.ndarray,
                     lr: float, step: int) -> list[Future]:
        """One ordered task per shard of the current map; each returns the rows it could not place."""
        pmap = self._routing.pmap
        per_chunk = max(1, self.config.chunk_bytes // (meta.dim * 4))
        futures = []
        for address, sel in fanout.by_shard(pmap, rows, every_shard=True):
            chunks = [(rows[sel[a:b]], grads[sel[a:b]]) for a, b in fanout.split(sel.size, per_chunk)]
            futures.append(self._net.sender(self._routing.key(address)).submit(
                self._send_push_chunks, address, table, pmap.epoch, chunks, lr, step))
        return futures

    def _send_push_chunks(self, address: str, table: str, epoch: int,
                          chunks: list[tuple[np.ndarray, np.ndarray]], lr: float, step: int
                          ) -> tuple[np.ndarray, np.ndarray] | None:
        """Runs on the shard's sender thread; returns the unsent (rows, grads) if the map went stale."""
        key = self._routing.key(address)
        for i, (rows, grads) in enumerate(chunks):
            seq = self._seq.get(key, 0) + 1
            self._seq[key] = seq

            def build(ep: int, seq: int = seq, i: int = i, rows: np.ndarray = rows,
                      grads: np.ndarray = grads) -> pb.PushGradientsRequest:
                header = pb.PushHeader(table=table, epoch=ep, worker_id=self.worker_id, seq=seq,
                                       step=_chunk_step(step, i, len(chunks)), lr=lr)
                return pb.PushGradientsRequest(header=header, rows=wire.encode(rows, "int64"),
                                               grads=wire.encode(grads, "float32"))
            try:
                self._routing.call(key, "PushGradients", build, epoch)
            except StaleEpochError:
                rest = chunks[i:]
                return np.concatenate([r for r, _ in rest]), np.concatenate([g for _, g in rest])
        return None

    def _finish_pushes(self, table: str, meta: TableMeta, futures: list[Future], lr: float, step: int) -> None:
        """Wait for push tasks; re-route whatever a stale map bounced (bounded by max_map_refreshes)."""
        for _ in range(self.config.max_map_refreshes + 1):
            left = [r for r in (f.result() for f in futures) if r is not None]
            if not left:
                return
            self._routing.refresh()
            rows, grads = sum_duplicates(np.concatenate([r for r, _ in left]), np.concatenate([g for _, g in left]))
            futures = self._submit_push(table, meta, rows, grads, lr, step)
        raise StaleEpochError("partition map kept changing while pushing", self._routing.pmap.epoch)

    def _pooled_backward(self, table: str, meta: TableMeta, rows: np.ndarray, projector: np.ndarray,
                         token: np.ndarray, scores: np.ndarray, grad_out: np.ndarray, lr: float,
                         step: int, min_step: int | None, pre: tuple[str, np.ndarray] | None = None
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        num_projectors = grad_out.shape[1]
        grad_scores = np.zeros(scores.shape, dtype=np.float32)
        grad_q_parts: list[tuple[np.ndarray, np.ndarray]] = []  # (tokens, dL/dq_p) per answer, summed at the end
        # dL/do travels once per chunk for every token the chunk touches, and chunks are cut by rows,
        # so small chunks would resend most of grad_out each time: one request per shard unless it
        # would pass half the message limit (see _backward_chunks)
        budget = self.config.max_message_bytes // 2
        per_entry, per_token = 3 * 8 + 4 * scores.shape[1], 8 + num_projectors * meta.dim * 4
        if pre is not None:
            per_token += 2 * 4 * pre[1].shape[1]  # q_p there, dL/dq_p back
        todo = np.arange(rows.size)  # entries not yet accepted by their shard
        for _ in range(self.config.max_map_refreshes + 1):
            pmap = self._routing.pmap
            futures = []
            # chunks never split a row's entries: each row gets one optimizer step per call
            for address, sel in fanout.by_shard(pmap, rows[todo], sort_by=rows[todo], every_shard=True):
                sel = todo[sel]
                chunks = _backward_chunks(sel, rows, token, per_entry, per_token, budget)
                futures.append(self._net.sender(self._routing.key(address)).submit(
                    self._send_backward_chunks, address, table, pmap.epoch, chunks, rows, projector, token,
                    scores, grad_out, grad_scores, lr, step, min_step, pre, grad_q_parts))
            left = [r for r in (f.result() for f in futures) if r is not None]
            if not left:
                if pre is None:
                    return grad_scores, None
                grad_q = np.zeros((grad_out.shape[0], pre[1].shape[1]), dtype=np.float32)
                for tokens, part in grad_q_parts:  # tokens unique within one answer
                    grad_q[tokens] += part
                return grad_scores, grad_q
            todo = np.concatenate(left)
            self._routing.refresh()
        raise StaleEpochError("partition map kept changing during pooled backward", self._routing.pmap.epoch)

    def _send_backward_chunks(self, address: str, table: str, epoch: int, chunks: list[np.ndarray],
                              rows: np.ndarray, projector: np.ndarray, token: np.ndarray, scores: np.ndarray,
                              grad_out: np.ndarray, grad_scores: np.ndarray, lr: float, step: int,
                              min_step: int | None, pre: tuple[str, np.ndarray] | None = None,
                              grad_q_parts: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray | None:
        """Runs on the shard's sender thread; returns the entries not sent if the map went stale."""
        num_projectors = grad_out.shape[1]
        key = self._routing.key(address)
        for i, part in enumerate(chunks):
            seq = self._seq.get(key, 0) + 1
            self._seq[key] = seq
            touched = np.unique(token[part])

            def build(ep: int, seq: int = seq, i: int = i, part: np.ndarray = part,
                      touched: np.ndarray = touched) -> pb.PooledBackwardRequest:
                header = pb.PushHeader(table=table, epoch=ep, worker_id=self.worker_id, seq=seq,
                                       step=_chunk_step(step, i, len(chunks)), lr=lr)
                req = pb.PooledBackwardRequest(
                    header=header, rows=_ids(rows[part]), projector=_ids(projector[part]),
                    token=_ids(token[part]), scores=wire.encode(scores[part], "float32"),
                    grad_out=wire.encode(grad_out[touched], "float32"), tokens_touched=_ids(touched),
                    num_projectors=num_projectors, min_step=min_step)
                if pre is not None:
                    req.pre_table = pre[0]
                    req.q_p.CopyFrom(wire.encode(pre[1][touched], "float32"))
                return req
            try:
                resp = self._routing.call(key, "PooledBackward", build, epoch)
            except StaleEpochError:
                return np.concatenate(chunks[i:])
            grad_scores[part] = wire.decode_values(resp.grad_scores, "grad_scores", trailing=(scores.shape[1],))
            if pre is not None and grad_q_parts is not None:
                grad_q_parts.append((touched, wire.decode(resp.grad_q_p, "grad_q_p", allowed=("float32",), ndim=2,
                                                          trailing=(touched.size, pre[1].shape[1]))))
        return None

    # -- plumbing ------------------------------------------------------------------------------
    def _map_from_info(self, addresses: list[str]) -> PartitionMap:
        """Merge the owned partitions each shard reports into one map (standalone shards)."""
        owned, nps, epoch = [], set(), 0
        for address in addresses:
            msg = self._net.unary(address, "Info", pb.InfoRequest())
            epoch = max(epoch, msg.epoch)
            parts: set[int] = set()
            for t in msg.tables:
                self._tables[t.name] = TableMeta(int(t.rows), int(t.dim), int(t.num_partitions))
                nps.add(int(t.num_partitions))
                parts.update(t.partitions)
            owned.append(sorted(parts))
        if len(nps) != 1:
            raise InvalidRequestError(f"shards {addresses} serve tables with partition counts {sorted(nps)}")
        return PartitionMap.from_owned(addresses, owned, nps.pop(), epoch=epoch)

    def _lookup_header(self, table: str, epoch: int, min_step: int | None) -> pb.LookupHeader:
        header = pb.LookupHeader(table=table, epoch=epoch, worker_id=self.worker_id)
        if min_step is not None:
            header.min_step = min_step
        return header

    @staticmethod
    def _rows(rows: np.ndarray, meta: TableMeta) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise InvalidRequestError(f"rows must be a 1-D integer array, got {rows.dtype} {list(rows.shape)}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= meta.rows):
            raise InvalidRequestError(f"rows must be in [0, {meta.rows}), got {rows.min()}..{rows.max()}")
        return rows

    def _backward_inputs(self, table: str, rows: Any, projector: Any, token: Any, scores: Any, grad_out: Any
                         ) -> tuple[TableMeta, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(the table's meta, dL/do float32 [T, E, d_v], (rows, projector, token, scores)) of a pooled
        backward, checked."""
        meta = self.table(table)
        grad_out = np.asarray(grad_out, dtype=np.float32)
        if grad_out.ndim != 3 or grad_out.shape[2] != meta.dim:
            raise InvalidRequestError(f"grad_out must be [T, E, {meta.dim}], got {list(grad_out.shape)}")
        return meta, grad_out, self._pooled_inputs(meta, rows, projector, token, scores, grad_out.shape[0])

    def _pre_inputs(self, pre_table: str | None, q_p: Any, num_tokens: int) -> tuple[str, np.ndarray] | None:
        """(pre_table, q_p float32 [T, d_p]) checked here (None: no pre-values); the shards check the rest."""
        if pre_table is None and q_p is None:
            return None
        if not pre_table or q_p is None:
            raise InvalidRequestError("pre-values need both pre_table and q_p")
        meta = self.table(pre_table)
        q = np.ascontiguousarray(q_p, dtype=np.float32)
        if q.shape != (num_tokens, meta.dim):
            raise InvalidRequestError(f"q_p must be [{num_tokens}, {meta.dim}] (d_p of {pre_table}), "
                                      f"got {list(q.shape)}")
        return pre_table, q

    def _pooled_inputs(self, meta: TableMeta, rows: Any, projector: Any, token: Any, scores: Any,
                       num_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = self._rows(rows, meta)
        projector = np.asarray(projector, dtype=np.int64)
        token = np.asarray(token, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        if projector.shape != rows.shape or token.shape != rows.shape or scores.ndim != 2 \
                or scores.shape[0] != rows.size:
            raise InvalidRequestError("rows, projector, token [n] and scores [n, h] must agree in n")
        if token.size and (token.min() < 0 or token.max() >= num_tokens):
            raise InvalidRequestError(f"token ids must be in [0, {num_tokens})")
        return rows, projector, token, scores
