"""The client's plumbing: channels per shard, deadlines, retries, concurrent fan-out (DESIGN §4.2-4.3).

`by_shard`, `split`, `group_chunks` and `interleave` cut a request into per-shard calls.
`ShardChannels` owns, for every shard address, a few gRPC channels (plaintext, or TLS when
`ClientConfig.tls_ca` is set), the per-shard ordered push sender threads, and the ways of
calling: `unary` (one blocking call), `run` (many calls, a window of them in flight per shard)
and `run_streams` (server-streaming calls, one per channel of a shard at a time).
Every call carries a deadline (`timeout_s`) and the shared-secret token; calls that fail with a
retryable code are retried with jittered exponential backoff up to `max_attempts` times, so no call
waits longer than about max_attempts * (timeout_s + max_backoff_s). An error that gives up names
the method, the shard address, the status code and the attempts made, so an unresponsive shard
is identified in one line.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from param_server import tls
from param_server.auth import bearer_metadata
from param_server.errors import ConfigError, ShardError, error_for_code
from param_server.partition_map import PartitionMap
from param_server.servicer import EPOCH_METADATA_KEY
from protos.ultramem.v1 import memory_pb2 as pb
from protos.ultramem.v1 import memory_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

LOOKUP_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.RESOURCE_EXHAUSTED})
PUSH_RETRY = LOOKUP_RETRY  # safe: a retried push reuses its seq and is applied once
_GATHER_PATH = "/ultramem.v1.MemoryShard/Gather"
_GATHER_STREAM_PATH = "/ultramem.v1.MemoryShard/GatherStream"


@dataclass(frozen=True)
class ClientConfig:
    """How the client splits, parallelises, retries and secures its calls."""

    chunk_bytes: int = 1 << 20  # target payload per request (DESIGN §8: ~1 MB is gRPC's sweet spot)
    max_in_flight: int = 8  # requests in flight per shard
    channels_per_shard: int = 2  # TCP connections per shard (one HTTP/2 connection serialises)
    stream_answers: int = 16  # chunk_bytes answers per GatherStream call (a lookup of more than one
    # answer per shard streams them: one call costs grpc-python more than one message); bounds what
    # one call's deadline must cover
    timeout_s: float = 60.0  # deadline per call attempt, a min_step wait included
    max_attempts: int = 6  # tries per call for retryable codes (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED)
    backoff_s: float = 0.02  # first retry delay; doubles up to max_backoff_s, with jitter
    max_backoff_s: float = 1.0
    max_message_bytes: int = 64 << 20  # must match the server's limit
    max_map_refreshes: int = 3  # re-routes after FAILED_PRECONDITION before giving up
    failover_timeout_s: float = 60.0  # how long a call to a dead shard (UNAVAILABLE) waits for the map
    # that replaces its address (a restarted shard, docs/reliability.md §6) before giving up
    token: str | None = field(default=None, repr=False)  # shared secret (`authorization: Bearer`); never printed
    tls_ca: str | None = None  # PEM root certificate(s) a shard must chain to; set = TLS on
    tls_cert: str | None = None  # PEM client certificate, for shards that require mTLS
    tls_key: str | None = field(default=None, repr=False)  # PEM key of tls_cert
    tls_server_name: str | None = None  # name to check the shard certificate against (default: the host)

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "max_in_flight", "channels_per_shard", "stream_answers", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"client.{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_bytes > self.max_message_bytes // 2:
            raise ConfigError("client.chunk_bytes must be at most half of max_message_bytes")
        if not self.failover_timeout_s >= 0:
            raise ConfigError(f"client.failover_timeout_s must be >= 0, got {self.failover_timeout_s}")
        if not self.timeout_s > 0:
            raise ConfigError(f"client.timeout_s must be > 0, got {self.timeout_s}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ConfigError("client.backoff_s must be in [0, client.max_backoff_s]")
        tls.check_pair("client", self.tls_cert, self.tls_key)
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("client.tls_cert needs client.tls_ca (the shard's root certificate)")


@dataclass
class Call:
    """One request of a fan-out: where, which method, and what to do with the answer."""

    address: str
    method: str  # stub attribute: "Gather", "PooledGather", ...
    request: Any
    on_done: Callable[[Any], None]
    attempt: int = 0


@dataclass
class StreamCall:
    """One server-streaming request of a fan-out: `answers` answers, handed to `on_answer` in order.

    A retried call asks only for what has not arrived: `request(done)` is the request for the
    answers from index `done` on.
    """

    address: str
    method: str  # "GatherStream"
    request: Callable[[int], Any]
    answers: int
    on_answer: Callable[[int, Any], None]  # (index of the answer in this call, answer)


def typed_error(err: grpc.RpcError, address: str, method: str, attempts: int) -> ShardError:
    """grpc.RpcError -> the matching typed error, its message naming the shard and the attempts.

    A FAILED_PRECONDITION carrying the shard's epoch becomes a StaleEpochError with that epoch.
    """
    epoch = None
    for key, value in err.trailing_metadata() or ():
        if key == EPOCH_METADATA_KEY:
            epoch = int(value)
    code = err.code().name
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    message = f"{method} to shard {address} failed with {code}{tries}: {err.details() or 'no details'}"
    return error_for_code(code, message, epoch=epoch)


def split(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) in pieces of at most `size`; one empty piece when n == 0."""
    return [(a, min(a + size, n)) for a in range(0, n, size)] or [(0, 0)]


def group_chunks(keys: np.ndarray, max_groups: int) -> list[tuple[int, int]]:
    """Split sorted `keys` [n] into pieces spanning at most `max_groups` distinct keys each (never
    cutting a run of equal keys); one empty piece when n == 0."""
    starts = np.flatnonzero(np.diff(keys, prepend=keys[:1] - 1)) if keys.size else np.zeros(0, np.int64)
    cuts = starts[::max_groups].tolist() + [keys.size]
    return list(itertools.pairwise(cuts)) or [(0, 0)]


def by_shard(pmap: PartitionMap, rows: np.ndarray, *, sort_by: np.ndarray | None = None,
             every_shard: bool = False) -> list[tuple[str, np.ndarray]]:
    """Positions of `rows` [n] grouped by owning shard: [(address, positions)] (stable; within a
    shard sorted by `sort_by` [n] if given; shards without rows included when `every_shard`)."""
    shards = pmap.route(rows)
    order = np.lexsort((sort_by, shards)) if sort_by is not None else np.argsort(shards, kind="stable")
    bounds = np.searchsorted(shards[order], np.arange(len(pmap.addresses) + 1))
    groups = []
    for s, address in enumerate(pmap.addresses):
        sel = order[bounds[s]:bounds[s + 1]]
        if sel.size or every_shard:
            groups.append((address, sel))
    return groups


def interleave(calls: list[Call]) -> list[Call]:
    """Round-robin over shards so every shard is busy from the first request on."""
    by_address: dict[str, list[Call]] = {}
    for call in calls:
        by_address.setdefault(call.address, []).append(call)
    mixed = itertools.zip_longest(*by_address.values())
    return [c for group in mixed for c in group if c is not None]


def map_from_proto(msg: pb.PartitionMap) -> PartitionMap:
    """A PartitionMap message -> PartitionMap."""
    return PartitionMap(epoch=msg.epoch, addresses=tuple(msg.addresses), owner=np.asarray(msg.owner, np.int32))


class ShardChannels:
    """Channels, stubs, sender threads and retrying calls for a set of shard addresses."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._metadata = bearer_metadata(config.token)
        self._credentials = (tls.channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
                             if config.tls_ca else None)
        self._lock = threading.Lock()
        self._channels: dict[str, list[grpc.Channel]] = {}
        self._stubs: dict[str, list[pb_grpc.MemoryShardStub]] = {}
        self._raw: dict[str, dict[str, list[Any]]] = {}  # address -> method -> a callable per channel
        self._senders: dict[str, ThreadPoolExecutor] = {}
        self._pool: ThreadPoolExecutor | None = None  # blocking calls of small fan-outs (`run`)
        self._rr = itertools.count()

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: message limits on both directions, one TCP connection per channel."""
        out: list[tuple[str, Any]] = [("grpc.max_send_message_length", self.config.max_message_bytes),
                                      ("grpc.max_receive_message_length", self.config.max_message_bytes),
                                      ("grpc.use_local_subchannel_pool", 1)]
        if self.config.tls_server_name:
            out.append(("grpc.ssl_target_name_override", self.config.tls_server_name))
        return out

    def open(self, address: str) -> None:
        """Dial `address` (channels_per_shard channels) unless already open."""
        with self._lock:
            if address in self._stubs:
                return
            channels = [self._channel(address) for _ in range(self.config.channels_per_shard)]
            self._channels[address] = channels
            # Gather answers stay bytes: wire.parse_tensor_field views the values without copying
            serialize = pb.GatherRequest.SerializeToString
            self._raw[address] = {
                "Gather": [c.unary_unary(_GATHER_PATH, request_serializer=serialize, response_deserializer=None)
                           for c in channels],
                "GatherStream": [c.unary_stream(_GATHER_STREAM_PATH, request_serializer=serialize,
                                                response_deserializer=None) for c in channels]}
            self._stubs[address] = [pb_grpc.MemoryShardStub(c) for c in channels]  # last: `address` is open

    def sender(self, address: str) -> ThreadPoolExecutor:
        """The one ordered push thread of `address` (a shard drops a seq <= the last it accepted)."""
        with self._lock:
            if address not in self._senders:
                self._senders[address] = ThreadPoolExecutor(1, thread_name_prefix=f"push-{address}")
            return self._senders[address]

    def unary(self, address: str, method: str, request: Any, retry: frozenset = LOOKUP_RETRY) -> Any:
        """One blocking call with retries on `retry` codes; a typed error naming the shard out."""
        return self._blocking(lambda: self._callable(address, method), address, method, request, retry)

    def run(self, calls: list[Call], retry: frozenset) -> None:
        """Run calls concurrently (a window of max_in_flight per shard); handlers run here, in order done.

        A small fan-out (at most one call per shard, as in decoding) runs as blocking calls on this
        client's persistent threads, the last in the caller: grpc-python starts a thread for each
        `.future()` on an idle channel, which costs more than the call itself at this size.
        """
        if len(calls) <= len({c.address for c in calls}):
            self._run_blocking(calls, retry)
            return
        pending = deque(calls)
        in_flight: deque[tuple[Call, grpc.Future]] = deque()
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
                        logger.debug("%s to %s: %s, retry %d", call.method, call.address, err.code().name,
                                     call.attempt + 1)
                        self._backoff(call.attempt)
                        call.attempt += 1
                        pending.appendleft(call)
                        continue
                    raise typed_error(err, call.address, call.method, call.attempt + 1) from None
                call.on_done(resp)
        finally:
            for _, future in in_flight:
                future.cancel()

    def run_streams(self, calls: list[StreamCall], retry: frozenset) -> None:
        """Run server-streaming calls: each shard's calls in channels_per_shard lanes, lanes
        concurrently (on this client's threads, the last in the caller), a lane's calls one after
        another; `on_answer` runs in the lane's thread. Raises the first lane's error once every
        lane has ended."""
        lanes: list[tuple[int, list[StreamCall]]] = []  # (channel, its calls)
        by_address: dict[str, list[StreamCall]] = {}
        for call in calls:
            by_address.setdefault(call.address, []).append(call)
        for mine in by_address.values():
            k = min(self.config.channels_per_shard, len(mine))
            lanes.extend((i, mine[i::k]) for i in range(k))

        def lane(channel: int, part: list[StreamCall]) -> None:
            for call in part:
                self._stream(call, retry, channel)

        pool = self._fanout_pool()
        futures = [pool.submit(lane, *one) for one in lanes[:-1]]
        error: BaseException | None = None
        try:
            if lanes:
                lane(*lanes[-1])
        except BaseException as err:  # wait for the other lanes before raising
            error = err
        for future in futures:
            try:
                future.result()
            except BaseException as err:
                error = error or err
        if error is not None:
            raise error

    def newest_map(self, addresses: Sequence[str]) -> PartitionMap | None:
        """The partition map with the highest epoch any of `addresses` answers (None: none answered)."""
        best = None
        for address in addresses:
            try:
                msg = self.unary(address, "GetPartitionMap", pb.GetPartitionMapRequest())
            except ShardError as err:
                logger.info("no partition map from %s: %s", address, err)
                continue
            if best is None or msg.epoch > best.epoch:
                best = msg
        return None if best is None else map_from_proto(best)

    def close(self) -> None:
        """Stop sender threads (after their queued pushes) and close every channel."""
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
            if self._pool is not None:
                senders.append(self._pool)
                self._pool = None
            channels = [c for cs in self._channels.values() for c in cs]
            self._channels.clear()
            self._stubs.clear()
            self._raw.clear()
        for sender in senders:
            sender.shutdown(wait=True)
        for channel in channels:
            channel.close()

    # -- helpers -------------------------------------------------------------------------------
    def _blocking(self, fn: Callable[[], Any], address: str, method: str, request: Any, retry: frozenset) -> Any:
        for attempt in range(self.config.max_attempts):
            try:
                return fn()(request, timeout=self.config.timeout_s, metadata=self._metadata)
            except grpc.RpcError as err:
                if err.code() not in retry or attempt + 1 == self.config.max_attempts:
                    raise typed_error(err, address, method, attempt + 1) from None
                logger.debug("%s to %s: %s, retry %d", method, address, err.code().name, attempt + 1)
                self._backoff(attempt)
        raise AssertionError("unreachable")

    def _run_blocking(self, calls: list[Call], retry: frozenset) -> None:
        """`run` for one call per shard: blocking calls on the pool, the last here; handlers here."""

        def one(call: Call) -> Any:
            return self._blocking(lambda: self._callable(call.address, call.method), call.address, call.method,
                                  call.request, retry)

        pool = self._fanout_pool()
        futures = [(c, pool.submit(one, c)) for c in calls[:-1]]
        if calls:
            calls[-1].on_done(one(calls[-1]))
        for call, future in futures:
            call.on_done(future.result())

    def _stream(self, call: StreamCall, retry: frozenset, channel: int) -> None:
        """One streaming call on the shard's `channel`, with retries on `retry` codes (each on the next
        channel); a retry asks only for the answers not yet had."""
        done, attempt = 0, 0
        while True:
            answers = self._callable(call.address, call.method, channel + attempt)(
                call.request(done), timeout=self.config.timeout_s, metadata=self._metadata)
            try:
                for answer in answers:
                    call.on_answer(done, answer)
                    done += 1
            except grpc.RpcError as err:
                if err.code() not in retry or attempt + 1 == self.config.max_attempts:
                    raise typed_error(err, call.address, call.method, attempt + 1) from None
                logger.debug("%s to %s: %s after %d answers, retry %d", call.method, call.address,
                             err.code().name, done, attempt + 1)
                self._backoff(attempt)
                attempt += 1
                continue
            finally:
                answers.cancel()  # no-op once the call has ended; stops it when on_answer raised
            if done != call.answers:
                raise ShardError(f"{call.method} to shard {call.address} ended after {done} of "
                                 f"{call.answers} answers")
            return

    def _fanout_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(8, thread_name_prefix="fanout")
            return self._pool

    def _channel(self, address: str) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(address, options=self.options())
        return grpc.secure_channel(address, self._credentials, options=self.options())

    def _callable(self, address: str, method: str, channel: int | None = None) -> Any:
        """`method` on one of the shard's channels (`channel`, else the next in turn); Gather's and
        GatherStream's answers stay bytes."""
        if address not in self._stubs:
            self.open(address)
        i = next(self._rr) if channel is None else channel
        raw = self._raw[address].get(method)
        if raw is not None:
            return raw[i % len(raw)]
        stubs = self._stubs[address]
        return getattr(stubs[i % len(stubs)], method)

    def _backoff(self, attempt: int) -> None:
        delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** attempt)
        time.sleep(delay * (0.5 + random.random() / 2))
