"""A push split into chunks counts as applied only when all of it is (DESIGN §4.3).

The client marks all but the last chunk with `step - 1`; at step 0 that is -1, which the shard
accepts for this purpose (and which advances no clock). So a `min_step` lookup never sees a part
of a push, step 0 included.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from param_server.client import Client, ClientConfig
from param_server.errors import InvalidRequestError, WaitTimeoutError
from param_server.server import create_server
from param_server.shard import Shard, ShardConfig
from storage.layout import TableSpec, init_partition_values

SPEC = TableSpec(name="mem", rows=64, dim=8, num_partitions=4, optimizer="sgd")
SMALL_CHUNKS = ClientConfig(chunk_bytes=2 * 8 * 4, backoff_s=0.001)  # two rows per push request


class _Steps(grpc.ServerInterceptor):
    """Records the step of every PushGradients; holds the ones with step `hold` until `release`."""

    def __init__(self, hold: int | None = None) -> None:
        self.steps: list[int] = []
        self.hold = hold
        self.release = threading.Event()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith("/PushGradients"):
            return handler
        inner = handler.unary_unary

        def wrapped(request, context):
            self.steps.append(request.header.step)
            if request.header.step == self.hold:
                self.release.wait(30)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


@pytest.fixture
def served(request):
    interceptor = request.param
    shard = Shard(ShardConfig(wait_timeout_s=0.3))
    shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in range(4)})
    server, _ = create_server(shard, interceptors=[interceptor])
    server.start()
    yield server.address, shard, interceptor
    interceptor.release.set()
    server.stop(0)
    shard.close()


def _full(rows: np.ndarray) -> np.ndarray:
    return np.stack([init_partition_values(SPEC, r % 4)[r // 4] for r in rows])


def test_shard_accepts_step_minus_one_and_it_advances_no_clock() -> None:
    with Shard(ShardConfig(wait_timeout_s=0.2)) as shard:
        shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in range(4)})
        assert shard.push("mem", 0, 1, -1, 1.0, np.array([1]), np.ones((1, 8), np.float32))
        shard.drain()
        assert shard.applied_step(0, "mem") == -1
        with pytest.raises(WaitTimeoutError):
            shard.gather("mem", np.array([1]), min_step=0)
        with pytest.raises(InvalidRequestError, match="step"):
            shard.push("mem", 0, 2, -2, 1.0, np.array([1]), np.ones((1, 8), np.float32))
        shard.push("mem", 0, 3, 0, 1.0, np.zeros(0, np.int64), np.zeros((0, 8), np.float32))
        shard.drain()
        np.testing.assert_allclose(shard.gather("mem", np.array([1]), min_step=0)[0], _full(np.array([1]))[0] - 1.0)


@pytest.mark.parametrize("served", [_Steps()], indirect=True)
@pytest.mark.parametrize("step", [0, 5])
def test_client_marks_all_but_the_last_chunk_with_step_minus_one(served, step: int) -> None:
    address, _, steps = served
    steps.steps.clear()
    with Client([address], config=SMALL_CHUNKS) as client:
        client.push("mem", np.arange(7), np.ones((7, 8), np.float32), lr=0.1, step=step)
    assert steps.steps == [step - 1] * 3 + [step]  # 7 rows in chunks of 2: 4 requests


@pytest.mark.parametrize("served", [_Steps(hold=0)], indirect=True)
def test_min_step_zero_lookup_never_sees_part_of_a_step_zero_push(served, wait_until) -> None:
    address, shard, steps = served
    rows = np.arange(7)
    with Client([address], config=SMALL_CHUNKS) as pusher, \
            Client([address], config=ClientConfig(max_attempts=1)) as reader:
        pusher.push("mem", rows, np.ones((7, 8), np.float32), lr=1.0, step=0, wait=False)
        # the first three chunks went through; the last one is held
        wait_until(lambda: len(steps.steps) >= 4, what="four push requests")
        shard.drain()
        assert shard.metrics()["pushes_applied"] == 3  # a partial update is in the table now...
        with pytest.raises(WaitTimeoutError):  # ...and a min_step=0 lookup does not see it
            reader.gather("mem", rows, min_step=0)
        steps.release.set()
        pusher.flush()
        shard.drain()  # applied: the lookup's short wait_timeout_s bounds only the failing case above
        np.testing.assert_allclose(reader.gather("mem", rows, min_step=0), _full(rows) - 1.0, rtol=1e-6)
