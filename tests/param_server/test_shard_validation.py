"""Every class of bad input gets its typed error and leaves the shard byte-for-byte unchanged.

STYLE §3.11: validate all, then mutate. The shard owns partitions 0 and 2 of a 4-partition,
50-row, d_v = 8 AdamW table; rows 1 and 3 (partitions 1, 3) live elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from param_server.errors import (
    STATUS_CODE_NAMES,
    InvalidRequestError,
    QueueFullError,
    ReadOnlyError,
    RequestTooLargeError,
    ShardError,
    StaleEpochError,
    UnknownTableError,
    WrongShardError,
    error_for_code,
    status_code_name,
)

from .conftest import snapshot

F32 = np.float32


def gather(**kw):
    args = {"table": "mem", "rows": np.array([0, 2, 4])} | kw
    return lambda s: s.gather(args.pop("table"), args.pop("rows"), **args)


def pooled(**kw):
    args = {"table": "mem", "rows": np.array([0, 2, 4]), "projector": np.array([0, 1, 1]),
            "token": np.array([5, 5, 6]), "scores": np.ones((3, 2), F32), "num_projectors": 2} | kw
    return lambda s: s.pooled_gather(**args)


def push(**kw):
    args = {"table": "mem", "worker_id": 0, "seq": 1, "step": 0, "lr": 0.1, "rows": np.array([0, 2, 2]),
            "grads": np.ones((3, 8), F32)} | kw
    return lambda s: s.push(**args)


def backward(**kw):
    args = {"table": "mem", "worker_id": 0, "seq": 1, "step": 0, "lr": 0.1, "rows": np.array([0, 2, 4]),
            "projector": np.array([0, 1, 1]), "token": np.array([5, 5, 6]), "scores": np.ones((3, 2), F32),
            "grad_out": np.ones((2, 2, 8), F32), "tokens_touched": np.array([5, 6]), "num_projectors": 2} | kw
    return lambda s: s.pooled_backward(**args)


NAN = np.full((3, 8), np.nan, F32)
BAD_REQUESTS = {
    # every method: table and rows
    "gather unknown table": (gather(table="nope"), UnknownTableError),
    "gather negative row": (gather(rows=np.array([0, -4])), InvalidRequestError),
    "gather row >= P": (gather(rows=np.array([0, 52])), InvalidRequestError),
    "gather row of another shard": (gather(rows=np.array([0, 1])), WrongShardError),
    "gather float rows": (gather(rows=np.array([0.0, 2.0])), InvalidRequestError),
    "gather 2-D rows": (gather(rows=np.array([[0, 2]])), InvalidRequestError),
    "gather empty": (gather(rows=np.zeros(0, np.int64)), InvalidRequestError),
    "gather too many rows": (gather(rows=np.zeros(65, np.int64)), RequestTooLargeError),
    "gather bad worker": (gather(worker_id=-1, min_step=0), InvalidRequestError),
    "pooled unknown table": (pooled(table="nope"), UnknownTableError),
    "pooled empty": (pooled(rows=np.zeros(0, np.int64), projector=np.zeros(0, np.int64),
                            token=np.zeros(0, np.int64), scores=np.zeros((0, 2), F32)), InvalidRequestError),
    "pooled row of another shard": (pooled(rows=np.array([0, 3, 4])), WrongShardError),
    "pooled projector = E": (pooled(projector=np.array([0, 2, 1])), InvalidRequestError),
    "pooled negative projector": (pooled(projector=np.array([0, -1, 1])), InvalidRequestError),
    "pooled projector length": (pooled(projector=np.array([0, 1])), InvalidRequestError),
    "pooled token length": (pooled(token=np.array([5, 5, 6, 7])), InvalidRequestError),
    "pooled negative token": (pooled(token=np.array([5, -5, 6])), InvalidRequestError),
    "pooled nan score": (pooled(scores=np.array([[1, 1], [np.nan, 1], [1, 1]], F32)), InvalidRequestError),
    "pooled inf score": (pooled(scores=np.array([[1, 1], [np.inf, 1], [1, 1]], F32)), InvalidRequestError),
    "pooled score rows": (pooled(scores=np.ones((2, 2), F32)), InvalidRequestError),
    "pooled h not dividing d_v": (pooled(scores=np.ones((3, 3), F32)), InvalidRequestError),
    "pooled int scores": (pooled(scores=np.ones((3, 2), np.int64)), InvalidRequestError),
    "pooled E = 0": (pooled(num_projectors=0), InvalidRequestError),
    "push unknown table": (push(table="nope"), UnknownTableError),
    "push row >= P": (push(rows=np.array([0, 2, 50])), InvalidRequestError),
    "push negative row": (push(rows=np.array([0, 2, -2])), InvalidRequestError),
    "push row of another shard": (push(rows=np.array([0, 2, 5])), WrongShardError),
    # 2 tokens x 33 projectors: a [2, 33, d_v] answer of 66 rows > 64, however few the entries
    "pooled answer too large": (pooled(num_projectors=33), RequestTooLargeError),
    "push too many rows": (push(rows=np.zeros(65, np.int64), grads=np.ones((65, 8), F32)), RequestTooLargeError),
    "push int grads": (push(grads=np.ones((3, 8), np.int32)), InvalidRequestError),
    "push grads d_v": (push(grads=np.ones((3, 9), F32)), InvalidRequestError),
    "push grads length": (push(grads=np.ones((2, 8), F32)), InvalidRequestError),
    "push nan grads": (push(grads=NAN), InvalidRequestError),
    "push inf grads": (push(grads=np.full((3, 8), -np.inf, F32)), InvalidRequestError),
    "push nan lr": (push(lr=float("nan")), InvalidRequestError),
    "push negative lr": (push(lr=-0.1), InvalidRequestError),
    "push seq 0": (push(seq=0), InvalidRequestError),
    "push negative worker": (push(worker_id=-1), InvalidRequestError),
    "push step below -1": (push(step=-2), InvalidRequestError),
    "push float seq": (push(seq=1.0), InvalidRequestError),
    "backward row of another shard": (backward(rows=np.array([0, 2, 7])), WrongShardError),
    "backward grad_out shape": (backward(grad_out=np.ones((2, 3, 8), F32)), InvalidRequestError),
    "backward nan grad_out": (backward(grad_out=np.full((2, 2, 8), np.nan, F32)), InvalidRequestError),
    "backward unsorted tokens": (backward(tokens_touched=np.array([6, 5])), InvalidRequestError),
    "backward token not touched": (backward(tokens_touched=np.array([5, 7])), InvalidRequestError),
    "backward projector = E": (backward(projector=np.array([0, 1, 2])), InvalidRequestError),
    "backward nan lr": (backward(lr=float("inf")), InvalidRequestError),
}


@pytest.fixture
def busy_shard(make_table, shards):
    """A shard with some history (pushes applied, AdamW state non-zero) and a small row limit."""
    shard = shards(make_table(optimizer="adamw", owned=[0, 2]), max_rows_per_request=64)
    shard.push("mem", 1, 1, 0, 0.1, np.array([0, 6]), np.ones((2, 8), F32))
    shard.drain()
    return shard


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_raises_its_error_and_changes_nothing(busy_shard, case):
    call, error = BAD_REQUESTS[case]
    before = snapshot(busy_shard)
    with pytest.raises(error):
        call(busy_shard)
    assert snapshot(busy_shard) == before


@pytest.mark.parametrize("make", [gather, pooled, push, backward])
def test_the_valid_base_request_of_each_method_succeeds(busy_shard, make):
    make()(busy_shard)  # so each bad case above differs from a working request in one field only


def test_every_error_maps_to_a_grpc_status_code_name():
    import grpc

    for cls, name in STATUS_CODE_NAMES.items():
        assert grpc.StatusCode[name].name == name, cls
    assert status_code_name(ReadOnlyError("x")) == "PERMISSION_DENIED"
    assert status_code_name(QueueFullError("x")) == "RESOURCE_EXHAUSTED"
    assert status_code_name(WrongShardError("x")) == "FAILED_PRECONDITION"
    assert status_code_name(ValueError("not ours")) == "INTERNAL"
    assert isinstance(InvalidRequestError("x"), ValueError) and isinstance(UnknownTableError("t"), KeyError)


def test_error_for_code_rebuilds_typed_errors_with_the_epoch():
    stale = error_for_code("FAILED_PRECONDITION", "map moved", epoch=7)
    assert isinstance(stale, StaleEpochError) and stale.epoch == 7
    assert isinstance(error_for_code("INVALID_ARGUMENT", "bad"), InvalidRequestError)
    assert type(error_for_code("UNKNOWN", "?")) is ShardError
    assert str(UnknownTableError("shard 0 holds no table 'x'")) == "shard 0 holds no table 'x'"
