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
A push split into chunks marks all but its last chunk with `step - 1`: a shard only counts the step
as applied once the whole push is. FAILED_PRECONDITION with a newer epoch refreshes the map and
re-routes.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from param_server import wire
from param_server.auth import bearer_metadata
from param_server.errors import (
    ConfigError,
    InvalidRequestError,
    ShardError,
    StaleEpochError,
    UnknownTableError,
    error_for_code,
)
from param_server.optimizers import sum_duplicates
from param_server.partition_map import PartitionMap
from param_server.servicer import EPOCH_METADATA_KEY
from protos.ultramem.v1 import memory_pb2 as pb
from protos.ultramem.v1 import memory_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_LOOKUP_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.RESOURCE_EXHAUSTED})
_PUSH_RETRY = _LOOKUP_RETRY  # safe: a retried push reuses its seq and is applied once
_GATHER_PATH = "/ultramem.v1.MemoryShard/Gather"


@dataclass(frozen=True)
class ClientConfig:
    """How the client splits, parallelises and retries."""

    chunk_bytes: int = 1 << 20  # target payload per request (DESIGN §8: ~1 MB is gRPC's sweet spot)
    max_in_flight: int = 8  # requests in flight per shard
    channels_per_shard: int = 2  # TCP connections per shard (one HTTP/2 connection serialises)
    timeout_s: float = 60.0  # deadline per call, a min_step wait included
    max_attempts: int = 6  # tries per call for retryable codes
    backoff_s: float = 0.02  # first retry delay; doubles up to max_backoff_s, with jitter
    max_backoff_s: float = 1.0
    max_message_bytes: int = 64 << 20  # must match the server's limit
    max_map_refreshes: int = 3  # re-routes after FAILED_PRECONDITION before giving up
    token: str | None = None  # shared secret sent as `authorization: Bearer <token>`

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "max_in_flight", "channels_per_shard", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"client.{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_bytes > self.max_message_bytes // 2:
            raise ConfigError("client.chunk_bytes must be at most half of max_message_bytes")
        if not self.timeout_s > 0:
            raise ConfigError(f"client.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class TableMeta:
    """What the client needs to know about a table: P, d_v, NP."""

    rows: int
    dim: int
    num_partitions: int


@dataclass
class _Call:
    address: str
    method: str  # stub attribute: "Gather", "PooledGather", ...
    request: Any
    on_done: Callable[[Any], None]
    attempt: int = 0


def _typed(err: grpc.RpcError) -> ShardError:
    """grpc.RpcError -> the matching typed error (StaleEpochError when the shard sent its epoch)."""
    epoch = None
    for key, value in err.trailing_metadata() or ():
        if key == EPOCH_METADATA_KEY:
            epoch = int(value)
    return error_for_code(err.code().name, err.details() or "", epoch=epoch)


def _split(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) in pieces of at most `size`; one empty piece when n == 0."""
    return [(a, min(a + size, n)) for a in range(0, n, size)] or [(0, 0)]


def _group_chunks(keys: np.ndarray, max_groups: int) -> list[tuple[int, int]]:
    """Split sorted `keys` [n] into pieces spanning at most `max_groups` distinct keys each (never
    cutting a run of equal keys); one empty piece when n == 0."""
    starts = np.flatnonzero(np.diff(keys, prepend=keys[:1] - 1)) if keys.size else np.zeros(0, np.int64)
    cuts = starts[::max_groups].tolist() + [keys.size]
    return list(itertools.pairwise(cuts)) or [(0, 0)]


class Client:
    """Talks to all shards of a table set; sync facade, concurrent fan-out inside."""

    def __init__(self, addresses: Sequence[str], *, partition_map: PartitionMap | None = None,
                 worker_id: int = 0, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self.worker_id = worker_id
        self._metadata = bearer_metadata(self.config.token)
        self._lock = threading.Lock()
        self._channels: dict[str, list[grpc.Channel]] = {}
        self._stubs: dict[str, list[pb_grpc.MemoryShardStub]] = {}
        self._raw_gather: dict[str, list[grpc.UnaryUnaryMultiCallable]] = {}
        self._rr = itertools.count()
        self._seq: dict[str, int] = {}
        self._senders: dict[str, ThreadPoolExecutor] = {}
        self._outstanding: list[tuple[Future, str, float, int]] = []
        self._tables: dict[str, TableMeta] = {}
        for address in addresses:
            self._open(address)
        self._map = partition_map or self._map_from_info(list(addresses))
        for address in self._map.addresses:
            self._open(address)

    @classmethod
    def connect(cls, address: str, **kw: Any) -> Client:
        """Bootstrap from one shard: ask it for the partition map, then dial every shard in it."""
        config = kw.get("config") or ClientConfig()
        with grpc.insecure_channel(address, options=cls._options(config)) as channel:
            try:
                msg = pb_grpc.MemoryShardStub(channel).GetPartitionMap(
                    pb.GetPartitionMapRequest(), timeout=config.timeout_s, metadata=bearer_metadata(config.token))
            except grpc.RpcError as err:
                raise _typed(err) from None
        return cls(list(msg.addresses), partition_map=cls._map_from_proto(msg), **kw)

    # -- public API ----------------------------------------------------------------------------
    @property
    def partition_map(self) -> PartitionMap:
        """The map requests are routed with now."""
        return self._map

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
        return self._rerouting(lambda: self._gather_once(table, meta, rows, min_step, wire_dtype, out))

    def pooled_gather(self, table: str, rows: np.ndarray, projector: np.ndarray, token: np.ndarray,
                      scores: np.ndarray, num_tokens: int, num_projectors: int, *,
                      min_step: int | None = None, wire_dtype: str = "float32") -> np.ndarray:
        """rows/projector/token int64 [n], scores float32 [n, h] -> float32 [T, E, d_v] (DESIGN §3.1 step 6)."""
        meta = self.table(table)
        rows, projector, token, scores = self._pooled_inputs(meta, rows, projector, token, scores, num_tokens)
        return self._rerouting(lambda: self._pooled_once(
            table, meta, rows, projector, token, scores, num_tokens, num_projectors, min_step, wire_dtype))

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
                        scores: np.ndarray, grad_out: np.ndarray, *, lr: float, step: int) -> np.ndarray:
        """dL/do grad_out [T, E, d_v] -> dL/ds [n, h]; each shard also queues its rows' update."""
        meta = self.table(table)
        grad_out = np.asarray(grad_out, dtype=np.float32)
        if grad_out.ndim != 3 or grad_out.shape[2] != meta.dim:
            raise InvalidRequestError(f"grad_out must be [T, E, {meta.dim}], got {list(grad_out.shape)}")
        rows, projector, token, scores = self._pooled_inputs(meta, rows, projector, token, scores, grad_out.shape[0])
        self.flush()  # its seqs must follow any earlier push
        return self._pooled_backward(table, meta, rows, projector, token, scores, grad_out, lr, step)

    def info(self) -> list[dict]:
        """One dict per shard: shard_id, address, epoch, read_only, tables (with partitions), metrics."""
        out = []
        for address in self._map.addresses if hasattr(self, "_map") else list(self._stubs):
            msg = self._unary(address, "Info", pb.InfoRequest())
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
        calls = [_Call(a, "Checkpoint", pb.CheckpointRequest(tables_dir=str(tables_dir)), lambda r: None)
                 for a in self._map.addresses]
        self._run(calls, frozenset({grpc.StatusCode.UNAVAILABLE}))

    def close(self) -> None:
        """Flush pushes, stop sender threads, close channels."""
        try:
            self.flush()
        finally:
            for sender in self._senders.values():
                sender.shutdown(wait=True)
            for channels in self._channels.values():
                for channel in channels:
                    channel.close()
            self._channels.clear()
            self._stubs.clear()
            self._raw_gather.clear()

    def __enter__(self) -> Client:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups -------------------------------------------------------------------------------
    def _gather_once(self, table: str, meta: TableMeta, rows: np.ndarray, min_step: int | None,
                     wire_dtype: str, out: np.ndarray | None) -> np.ndarray:
        pmap = self._map
        uniq, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        out = np.empty((rows.size, meta.dim), dtype=np.float32) if out is None else out
        direct = uniq.size == rows.size  # all unique: answers go straight to their request positions
        target, dest = (out, first) if direct else (np.empty((uniq.size, meta.dim), np.float32), None)
        per_chunk = max(1, self.config.chunk_bytes // (meta.dim * wire.numpy_dtype(wire_dtype).itemsize))
        header = self._lookup_header(table, pmap.epoch, min_step)
        enum = wire.dtype_enum(wire_dtype)

        def make(sel: np.ndarray) -> Callable[[Any], None]:
            where = dest[sel] if dest is not None else sel
            def done(resp: bytes) -> None:  # a serialized GatherResponse
                target[where] = wire.parse_tensor_field(resp, 1, "values", allowed=(wire_dtype,), ndim=2,
                                                        trailing=(sel.size, meta.dim))
            return done

        calls = []
        for address, sel in self._by_shard(pmap, uniq):
            for a, b in _split(sel.size, per_chunk):
                if b > a:
                    part = sel[a:b]
                    req = pb.GatherRequest(header=header, rows=wire.encode(uniq[part], "int64"), wire_dtype=enum)
                    calls.append(_Call(address, "Gather", req, make(part)))
        self._run(self._interleave(calls), _LOOKUP_RETRY)
        if not direct:
            np.take(target, inverse.reshape(-1), axis=0, out=out)
        return out

    def _pooled_once(self, table: str, meta: TableMeta, rows: np.ndarray, projector: np.ndarray,
                     token: np.ndarray, scores: np.ndarray, num_tokens: int, num_projectors: int,
                     min_step: int | None, wire_dtype: str) -> np.ndarray:
        pmap = self._map
        out = np.zeros((num_tokens, num_projectors, meta.dim), dtype=np.float32)
        header = self._lookup_header(table, pmap.epoch, min_step)
        per_token = num_projectors * meta.dim * wire.numpy_dtype(wire_dtype).itemsize
        max_tokens = max(1, self.config.chunk_bytes // per_token)

        def done(resp: pb.PooledGatherResponse) -> None:
            tokens = wire.decode_ids(resp.tokens, "tokens")
            sums = wire.decode(resp.sums, "sums", allowed=(wire_dtype,), ndim=3,
                               trailing=(tokens.size, num_projectors, meta.dim))
            out[tokens] += sums  # tokens are unique within one answer

        calls = []
        for address, sel in self._by_shard(pmap, rows, sort_by=token):
            for a, b in _group_chunks(token[sel], max_tokens):
                if b > a:
                    part = sel[a:b]
                    req = pb.PooledGatherRequest(
                        header=header, rows=wire.encode(rows[part], "int64"),
                        projector=wire.encode(projector[part], "int64"), token=wire.encode(token[part], "int64"),
                        scores=wire.encode(scores[part], "float32"), num_projectors=num_projectors,
                        wire_dtype=wire.dtype_enum(wire_dtype))
                    calls.append(_Call(address, "PooledGather", req, done))
        self._run(self._interleave(calls), _LOOKUP_RETRY)
        return out

    # -- pushes --------------------------------------------------------------------------------
    def _submit_push(self, table: str, meta: TableMeta, rows: np.ndarray, grads: np.ndarray,
                     lr: float, step: int) -> list[Future]:
        """One ordered task per shard of the current map; each returns the rows it could not place."""
        pmap = self._map
        per_chunk = max(1, self.config.chunk_bytes // (meta.dim * 4))
        futures = []
        for address, sel in self._by_shard(pmap, rows, every_shard=True):
            chunks = [(rows[sel[a:b]], grads[sel[a:b]]) for a, b in _split(sel.size, per_chunk)]
            futures.append(self._sender(address).submit(
                self._send_push_chunks, address, table, pmap.epoch, chunks, lr, step))
        return futures

    def _send_push_chunks(self, address: str, table: str, epoch: int,
                          chunks: list[tuple[np.ndarray, np.ndarray]], lr: float, step: int
                          ) -> tuple[np.ndarray, np.ndarray] | None:
        """Runs on the shard's sender thread; returns the unsent (rows, grads) if the map went stale."""
        for i, (rows, grads) in enumerate(chunks):
            seq = self._seq.get(address, 0) + 1
            self._seq[address] = seq
            header = pb.PushHeader(table=table, epoch=epoch, worker_id=self.worker_id, seq=seq,
                                   step=step if i == len(chunks) - 1 else max(step - 1, 0), lr=lr)
            req = pb.PushGradientsRequest(header=header, rows=wire.encode(rows, "int64"),
                                          grads=wire.encode(grads, "float32"))
            try:
                self._unary(address, "PushGradients", req, retry=_PUSH_RETRY)
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
            self._refresh_map()
            rows, grads = sum_duplicates(np.concatenate([r for r, _ in left]), np.concatenate([g for _, g in left]))
            futures = self._submit_push(table, meta, rows, grads, lr, step)
        raise StaleEpochError("partition map kept changing while pushing", self._map.epoch)

    def _pooled_backward(self, table: str, meta: TableMeta, rows: np.ndarray, projector: np.ndarray,
                         token: np.ndarray, scores: np.ndarray, grad_out: np.ndarray, lr: float,
                         step: int) -> np.ndarray:
        num_projectors = grad_out.shape[1]
        grad_scores = np.zeros(scores.shape, dtype=np.float32)
        max_rows = max(1, self.config.chunk_bytes // (num_projectors * meta.dim * 4))
        todo = np.arange(rows.size)  # entries not yet accepted by their shard
        for _ in range(self.config.max_map_refreshes + 1):
            pmap = self._map
            futures = []
            # chunks never split a row's entries: each row gets one optimizer step per call
            for address, sel in self._by_shard(pmap, rows[todo], sort_by=rows[todo], every_shard=True):
                sel = todo[sel]
                chunks = [sel[a:b] for a, b in _group_chunks(rows[sel], max_rows)]
                futures.append(self._sender(address).submit(
                    self._send_backward_chunks, address, table, pmap.epoch, chunks, rows, projector, token,
                    scores, grad_out, grad_scores, lr, step))
            left = [r for r in (f.result() for f in futures) if r is not None]
            if not left:
                return grad_scores
            todo = np.concatenate(left)
            self._refresh_map()
        raise StaleEpochError("partition map kept changing during pooled backward", self._map.epoch)

    def _send_backward_chunks(self, address: str, table: str, epoch: int, chunks: list[np.ndarray],
                              rows: np.ndarray, projector: np.ndarray, token: np.ndarray, scores: np.ndarray,
                              grad_out: np.ndarray, grad_scores: np.ndarray, lr: float, step: int
                              ) -> np.ndarray | None:
        """Runs on the shard's sender thread; returns the entries not sent if the map went stale."""
        num_projectors = grad_out.shape[1]
        for i, part in enumerate(chunks):
            seq = self._seq.get(address, 0) + 1
            self._seq[address] = seq
            touched = np.unique(token[part])
            header = pb.PushHeader(table=table, epoch=epoch, worker_id=self.worker_id, seq=seq,
                                   step=step if i == len(chunks) - 1 else max(step - 1, 0), lr=lr)
            req = pb.PooledBackwardRequest(
                header=header, rows=wire.encode(rows[part], "int64"), projector=wire.encode(projector[part], "int64"),
                token=wire.encode(token[part], "int64"), scores=wire.encode(scores[part], "float32"),
                grad_out=wire.encode(grad_out[touched], "float32"), tokens_touched=wire.encode(touched, "int64"),
                num_projectors=num_projectors)
            try:
                resp = self._unary(address, "PooledBackward", req, retry=_PUSH_RETRY)
            except StaleEpochError:
                return np.concatenate(chunks[i:])
            grad_scores[part] = wire.decode_values(resp.grad_scores, "grad_scores", trailing=(scores.shape[1],))
        return None

    # -- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def _options(config: ClientConfig) -> list[tuple[str, Any]]:
        return [("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.use_local_subchannel_pool", 1)]  # each channel gets its own TCP connection

    def _open(self, address: str) -> None:
        if address in self._stubs:
            return
        channels = [grpc.insecure_channel(address, options=self._options(self.config))
                    for _ in range(self.config.channels_per_shard)]
        self._channels[address] = channels
        self._stubs[address] = [pb_grpc.MemoryShardStub(c) for c in channels]
        # Gather answers stay bytes: wire.parse_tensor_field views the values without copying
        self._raw_gather[address] = [c.unary_unary(_GATHER_PATH, request_serializer=pb.GatherRequest.SerializeToString,
                                                   response_deserializer=None) for c in channels]

    def _stub(self, address: str) -> pb_grpc.MemoryShardStub:
        stubs = self._stubs[address]
        return stubs[next(self._rr) % len(stubs)]

    def _callable(self, address: str, method: str) -> Any:
        if method == "Gather":
            raw = self._raw_gather[address]
            return raw[next(self._rr) % len(raw)]
        return getattr(self._stub(address), method)

    def _sender(self, address: str) -> ThreadPoolExecutor:
        with self._lock:
            if address not in self._senders:
                self._senders[address] = ThreadPoolExecutor(1, thread_name_prefix=f"push-{address}")
            return self._senders[address]

    def _backoff(self, attempt: int) -> None:
        delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** attempt)
        time.sleep(delay * (0.5 + random.random() / 2))

    def _unary(self, address: str, method: str, request: Any, retry: frozenset = _LOOKUP_RETRY) -> Any:
        """One blocking call with retries on `retry` codes; typed errors out."""
        for attempt in range(self.config.max_attempts):
            try:
                return getattr(self._stub(address), method)(
                    request, timeout=self.config.timeout_s, metadata=self._metadata)
            except grpc.RpcError as err:
                if err.code() not in retry or attempt + 1 == self.config.max_attempts:
                    raise _typed(err) from None
                logger.debug("%s to %s: %s, retry %d", method, address, err.code().name, attempt + 1)
                self._backoff(attempt)
        raise AssertionError("unreachable")

    def _run(self, calls: list[_Call], retry: frozenset) -> None:
        """Run calls concurrently (a window of max_in_flight per shard); handlers run here, in order done."""
        pending = deque(calls)
        in_flight: deque[tuple[_Call, grpc.Future]] = deque()
        window = self.config.max_in_flight * max(1, len({c.address for c in calls}))
        try:
            while pending or in_flight:
                while pending and len(in_flight) < window:
                    call = pending.popleft()
                    future = self._callable(call.address, call.method).future(
                        call.request, timeout=self.config.timeout_s, metadata=self._metadata)
                    in_flight.append((call, future))
                call, future = in_flight.popleft()
                try:
                    resp = future.result()
                except grpc.RpcError as err:
                    if err.code() in retry and call.attempt + 1 < self.config.max_attempts:
                        self._backoff(call.attempt)
                        call.attempt += 1
                        pending.appendleft(call)
                        continue
                    raise _typed(err) from None
                call.on_done(resp)
        finally:
            for _, future in in_flight:
                future.cancel()

    def _rerouting(self, attempt: Callable[[], np.ndarray]) -> np.ndarray:
        """Run an idempotent lookup; on a stale-epoch answer refresh the map and run it again."""
        for _ in range(self.config.max_map_refreshes):
            try:
                return attempt()
            except StaleEpochError as err:
                logger.info("partition map epoch %d is stale (%s); refreshing", self._map.epoch, err)
                self._refresh_map()
        return attempt()

    def _refresh_map(self) -> None:
        """Ask the known shards for their map; install the newest."""
        best = None
        for address in list(self._map.addresses):
            try:
                msg = self._unary(address, "GetPartitionMap", pb.GetPartitionMapRequest())
            except ShardError:
                continue
            if best is None or msg.epoch > best.epoch:
                best = msg
        if best is None:
            raise StaleEpochError("no shard answered GetPartitionMap", self._map.epoch)
        new = self._map_from_proto(best)
        for address in new.addresses:
            self._open(address)
        self._map = new

    @staticmethod
    def _map_from_proto(msg: pb.PartitionMap) -> PartitionMap:
        return PartitionMap(epoch=msg.epoch, addresses=tuple(msg.addresses), owner=np.asarray(msg.owner, np.int32))

    def _map_from_info(self, addresses: list[str]) -> PartitionMap:
        """Merge the owned partitions each shard reports into one map (standalone shards)."""
        owned, nps, epoch = [], set(), 0
        for address in addresses:
            msg = self._unary(address, "Info", pb.InfoRequest())
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

    def _by_shard(self, pmap: PartitionMap, rows: np.ndarray, *, sort_by: np.ndarray | None = None,
                  every_shard: bool = False) -> list[tuple[str, np.ndarray]]:
        """Group positions of `rows` by owning shard (stable; within a shard sorted by `sort_by`)."""
        shards = pmap.route(rows)
        order = np.lexsort((sort_by, shards)) if sort_by is not None else np.argsort(shards, kind="stable")
        bounds = np.searchsorted(shards[order], np.arange(len(pmap.addresses) + 1))
        groups = []
        for s, address in enumerate(pmap.addresses):
            sel = order[bounds[s]:bounds[s + 1]]
            if sel.size or every_shard:
                groups.append((address, sel))
        return groups

    @staticmethod
    def _interleave(calls: list[_Call]) -> list[_Call]:
        """Round-robin over shards so every shard is busy from the first request on."""
        by_address: dict[str, list[_Call]] = {}
        for call in calls:
            by_address.setdefault(call.address, []).append(call)
        mixed = itertools.zip_longest(*by_address.values())
        return [c for group in mixed for c in group if c is not None]

    @staticmethod
    def _rows(rows: np.ndarray, meta: TableMeta) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise InvalidRequestError(f"rows must be a 1-D integer array, got {rows.dtype} {list(rows.shape)}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= meta.rows):
            raise InvalidRequestError(f"rows must be in [0, {meta.rows}), got {rows.min()}..{rows.max()}")
        return rows

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
