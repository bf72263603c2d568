"""A shard that stops answering: every client call ends within its deadline and names the shard.

docs/reliability.md, "unresponsive shard". Three kinds of silence: a socket that accepts TCP and
never speaks (no gRPC server behind it), a real server whose handlers block, and an address where
nothing listens. The client's bound is max_attempts * (timeout_s + max_backoff_s) per call; each
test measures the wall time against it (plus slack for a busy 2-core machine).
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from param_server.client import Client, ClientConfig
from param_server.errors import ShardError, WaitTimeoutError
from param_server.server import create_server
from param_server.shard import Shard
from storage.layout import TableSpec, init_partition_values
from tests.param_server.conftest import with_behaviour

SPEC = TableSpec(name="mem", rows=64, dim=8, num_partitions=4, optimizer="sgd")
FAST = ClientConfig(timeout_s=0.4, max_attempts=2, backoff_s=0.01, max_backoff_s=0.01)
BOUND_S = FAST.max_attempts * (FAST.timeout_s + FAST.max_backoff_s)
SLACK_S = 3.0  # scheduling noise on a busy 2-core machine


class _Hang(grpc.ServerInterceptor):
    """While `hanging` is set, MemoryShard handlers block until `release` (at most 30 s)."""

    def __init__(self, *, times: int | None = None) -> None:
        self.hanging = threading.Event()
        self.release = threading.Event()
        self.left = times  # hang only this many calls (None = every call while hanging)
        self.hung = 0
        self.reached = threading.Event()  # set when a call first reaches the hang

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith("/ultramem.v1.MemoryShard/"):
            return handler

        def wrap(inner):
            def wrapped(request, context):
                if self.hanging.is_set() and (self.left is None or self.left > 0):
                    if self.left is not None:
                        self.left -= 1
                    self.hung += 1
                    self.reached.set()
                    self.release.wait(30)
                return inner(request, context)
            return wrapped

        return with_behaviour(handler, wrap)


def _serve(owned: range, interceptors=()) -> tuple:
    shard = Shard()
    shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in owned})
    server, _ = create_server(shard, interceptors=interceptors)
    return server.start(), shard


@pytest.fixture
def hung_pair() -> Iterator[tuple[list[str], _Hang]]:
    """Two shards (partitions 0,1 and 2,3); the second hangs once its `hanging` event is set."""
    hang = _Hang()
    good, good_shard = _serve(range(2))
    bad, bad_shard = _serve(range(2, 4), [hang])
    yield [good.address, bad.address], hang
    hang.release.set()
    for server, shard in ((good, good_shard), (bad, bad_shard)):
        server.stop(0)
        shard.close()


@pytest.fixture
def silent_socket() -> Iterator[str]:
    """host:port of a socket that completes TCP handshakes (kernel backlog) and never says a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _timed_failure(call) -> tuple[ShardError, float]:
    start = time.monotonic()
    with pytest.raises(ShardError) as info:
        call()
    return info.value, time.monotonic() - start


def test_socket_that_never_replies_times_out_within_the_deadline_and_names_the_address(silent_socket) -> None:
    err, elapsed = _timed_failure(lambda: Client([silent_socket], config=FAST))  # Info on connect
    assert isinstance(err, WaitTimeoutError)
    assert silent_socket in str(err) and "DEADLINE_EXCEEDED" in str(err) and "2 attempts" in str(err)
    assert elapsed <= BOUND_S + SLACK_S


@pytest.mark.parametrize("chunk_rows", [64, 2], ids=["one-answer-calls", "streamed"])
def test_hung_shard_fails_lookups_and_pushes_in_bounded_time_naming_only_that_shard(hung_pair, chunk_rows) -> None:
    (good, bad), hang = hung_pair
    client = Client([good, bad], config=dataclasses.replace(FAST, chunk_bytes=chunk_rows * SPEC.dim * 4))
    hang.hanging.set()
    rows = np.arange(8)  # partitions 0..3: both shards
    err, elapsed = _timed_failure(lambda: client.gather("mem", rows))
    assert bad in str(err) and good not in str(err) and "DEADLINE_EXCEEDED" in str(err)
    assert ("GatherStream" in str(err)) == (chunk_rows < 4)
    assert f"after {FAST.max_attempts} attempts" in str(err)  # retried, then gave up
    assert elapsed <= BOUND_S + SLACK_S
    err, elapsed = _timed_failure(
        lambda: client.push("mem", rows, np.ones((8, 8), np.float32), lr=0.1, step=0))
    assert bad in str(err) and "PushGradients" in str(err)
    assert f"after {FAST.max_attempts} attempts" in str(err)
    assert elapsed <= BOUND_S + SLACK_S
    start = time.monotonic()
    client.close()  # nothing outstanding is waited for forever
    assert time.monotonic() - start <= BOUND_S + SLACK_S
    # The hang is what timed the calls out. Not every attempt need reach the handler: on a busy
    # machine an attempt's 0.4 s deadline can pass before the server starts it (and it may start
    # after the client gave up).
    assert hang.reached.wait(30)


def test_lookups_of_rows_on_the_healthy_shard_still_answer_while_another_hangs(hung_pair) -> None:
    (good, bad), hang = hung_pair
    with Client([good, bad], config=FAST) as client:
        hang.hanging.set()
        rows = np.array([0, 1, 4, 5])  # partitions 0 and 1: the healthy shard
        want = np.stack([init_partition_values(SPEC, r % 4)[r // 4] for r in rows])
        np.testing.assert_array_equal(client.gather("mem", rows), want)
        hang.release.set()  # let the close() flush reach the other shard


def test_shard_that_hangs_once_is_retried_and_answers() -> None:
    hang = _Hang(times=1)
    server, shard = _serve(range(4), [hang])
    try:
        with Client([server.address], config=FAST) as client:
            hang.hanging.set()
            start = time.monotonic()
            got = client.gather("mem", np.array([3]))
            assert time.monotonic() - start <= BOUND_S + SLACK_S
        np.testing.assert_array_equal(got[0], init_partition_values(SPEC, 3)[0])
        assert hang.hung == 1
    finally:
        hang.release.set()
        server.stop(0)
        shard.close()


def test_address_where_nothing_listens_is_unavailable_naming_the_address() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # the port is free now: connection refused
    err, elapsed = _timed_failure(lambda: Client([address], config=FAST))
    assert address in str(err) and "UNAVAILABLE" in str(err)
    assert elapsed <= BOUND_S + SLACK_S
