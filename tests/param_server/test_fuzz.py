"""Fuzz a live shard server with >= 10,000 hostile requests (docs/reliability.md, "bad input").

DESIGN §4.2 / STYLE §11 promise: the servicer and the shard validate everything before mutating,
and every bad request gets a proper status code. Hypothesis builds requests from the proto
messages and sends them as raw bytes through generic `channel.unary_unary` callables (identity
serializers, so nothing on the client side cleans them up), each with a deadline:

- random bytes as the body of every data and control method;
- structured requests with one defect each: huge dimensions (shapes claiming 2^40.. elements with
  a few bytes), negative / huge row ids, NaN / Inf, dtype mismatches, wrong shapes, unknown or
  empty tables, stale epochs, bad seqs / steps / lr, bad pooled arguments, too many rows, rows of a
  partition owned elsewhere, and duplicate seqs (valid content: acknowledged and dropped);
- truncated and byte-mutated serializations of valid lookups and of pushes whose every gradient is
  NaN (so no mutation can turn them into an applicable push);
- Checkpoint with hostile `tables_dir`s (absolute paths, `..` chains, a symlink out, names too long,
  NUL bytes, files, directories without the table group) against a server whose Checkpoint is
  confined to one directory: PERMISSION_DENIED, NOT_FOUND or INVALID_ARGUMENT, and nothing outside
  that directory is touched.

Asserted: every call answers before its deadline with a code from the class's expected set (never
UNKNOWN or INTERNAL), a push answered OK was a dropped duplicate, and afterwards the shard's values,
optimizer state, clocks and seqs are byte-for-byte what they were, while valid requests still answer
correctly. Counts per class and code are printed (run with -s) and kept in docs/reliability.md.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from param_server import wire
from param_server.partition_map import PartitionMap
from param_server.server import ServerConfig, create_server
from param_server.shard import Shard, ShardConfig
from protos.ultramem.v1 import memory_pb2 as pb
from storage.layout import TableSpec, init_partition_values
from storage.table_store import create_table
from tests.param_server.conftest import snapshot

SPEC = TableSpec(name="mem", rows=64, dim=8, num_partitions=4, optimizer="adamw")
OWNED = (0, 1, 2)  # partition 3 lives "elsewhere"
EPOCH = 3  # the shard's partition-map epoch: 1 and 2 are stale
MAX_ROWS = 1000
LAST_SEQ, LAST_STEP = 100, 7  # worker 1 has pushed seq 1..100, step 7 is applied
DEADLINE_S = 5.0
C = grpc.StatusCode
SETTINGS = {"deadline": None, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

OWNED_ROWS = [r for r in range(SPEC.rows) if r % 4 in OWNED]
FOREIGN_ROWS = [r for r in range(SPEC.rows) if r % 4 == 3]
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["MemoryShard"].methods]
READS = {"Gather", "GatherStream", "PooledGather", "Info", "GetPartitionMap"}
WRITES = {"PushGradients", "PooledBackward"}
BAD = {C.INVALID_ARGUMENT}
CHECKPOINT_CODES = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.PERMISSION_DENIED}

COUNTS: Counter[tuple[str, str]] = Counter()


class Target:
    """The live server, raw callables per method, and the check every answer goes through."""

    def __init__(self) -> None:
        self.shard = Shard(ShardConfig(max_rows_per_request=MAX_ROWS, wait_timeout_s=0.5))
        self.shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in OWNED})
        for seq in (1, LAST_SEQ):  # optimizer state, clocks and seqs that must survive the fuzz
            self.shard.push("mem", 1, seq, LAST_STEP, 0.01, np.array([0, 5, 10]), np.ones((3, 8), np.float32))
        # Checkpoint may write only under root/ckpt; root/outside holds a table group it must never touch
        self.root = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-"))
        (self.root / "ckpt" / "empty").mkdir(parents=True)
        (self.root / "ckpt" / "file").write_text("not a directory")
        create_table(self.root / "outside" / "mem", SPEC, initialize=False)
        (self.root / "ckpt" / "link").symlink_to(self.root / "outside")
        self.server, _ = create_server(self.shard, ServerConfig(max_message_bytes=1 << 20,
                                                                checkpoint_dir=str(self.root / "ckpt")))
        self.server.start()
        self.server.set_partition_map(PartitionMap.from_owned([self.server.address], [OWNED], 4, epoch=EPOCH))
        options = [("grpc.max_send_message_length", 8 << 20)]
        self.channel = grpc.insecure_channel(self.server.address, options=options)
        self.calls = {m: self.channel.unary_unary(f"/ultramem.v1.MemoryShard/{m}") for m in METHODS}
        stream = self.channel.unary_stream("/ultramem.v1.MemoryShard/GatherStream")
        self.calls["GatherStream"] = lambda body, timeout: list(stream(body, timeout=timeout))  # every answer

    def send(self, cls: str, method: str, body: bytes, expected: set[grpc.StatusCode]) -> grpc.StatusCode:
        """Send raw `body`, assert the code is expected and in time, count it."""
        start = time.monotonic()
        try:
            reply = self.calls[method](body, timeout=DEADLINE_S)
            code = C.OK
        except grpc.RpcError as err:
            code, reply = err.code(), None
            assert code not in (C.UNKNOWN, C.INTERNAL), (cls, method, err.details())
        assert time.monotonic() - start < DEADLINE_S, (cls, method)
        assert code in expected, (cls, method, code, body[:200])
        if code == C.OK and method in WRITES:  # only a duplicate seq may be answered OK
            response = pb.PushGradientsResponse if method == "PushGradients" else pb.PooledBackwardResponse
            assert not response.FromString(reply).accepted, (cls, method)
        COUNTS[(cls, code.name)] += 1
        return code

    def outside(self) -> dict[str, int]:
        """Every file outside the checkpoint directory, with its size and mtime (must never change)."""
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in (self.root / "outside").rglob("*")}

    def close(self) -> None:
        import shutil

        self.channel.close()
        self.server.stop(0)
        self.shard.close()
        shutil.rmtree(self.root, ignore_errors=True)


# --- request builders --------------------------------------------------------------------------


def tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def lookup_header(table: str = "mem", epoch: int = 0, worker: int = 1) -> pb.LookupHeader:
    return pb.LookupHeader(table=table, epoch=epoch, worker_id=worker)


def push_header(table: str = "mem", epoch: int = 0, worker: int = 1, seq: int = 5, step: int = 0,
                lr: float = 0.1) -> pb.PushHeader:
    return pb.PushHeader(table=table, epoch=epoch, worker_id=worker, seq=seq, step=step, lr=lr)


@st.composite
def valid_parts(draw, kind: str) -> dict[str, object]:
    """Fields of a request of `kind` that would be valid (pushes: a duplicate seq of worker 1)."""
    n = draw(st.integers(1, 6))
    rows = np.array(draw(st.lists(st.sampled_from(OWNED_ROWS), min_size=n, max_size=n)), np.int64)
    parts: dict[str, object] = {"rows": wire.encode(rows)}
    if kind in ("pooled", "backward"):
        e = draw(st.integers(1, 3))
        h = draw(st.sampled_from([1, 2, 4, 8]))
        token = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), np.int64)
        parts.update(projector=wire.encode(np.array(draw(st.lists(st.integers(0, e - 1), min_size=n, max_size=n)))),
                     token=wire.encode(token), scores=wire.encode(np.ones((n, h), np.float32)), num_projectors=e)
        if kind == "backward":
            touched = np.unique(token)
            parts.update(tokens_touched=wire.encode(touched),
                         grad_out=wire.encode(np.ones((touched.size, e, 8), np.float32)))
    if kind == "push":
        parts["grads"] = wire.encode(np.ones((n, 8), np.float32))
    return parts


def build(kind: str, parts: dict, header: dict) -> tuple[str, bytes]:
    """(method, serialized request) from fields and header overrides."""
    if kind == "gather":
        return "Gather", pb.GatherRequest(header=lookup_header(**header), **parts).SerializeToString()
    if kind == "pooled":
        return "PooledGather", pb.PooledGatherRequest(header=lookup_header(**header), **parts).SerializeToString()
    if kind == "push":
        return "PushGradients", pb.PushGradientsRequest(header=push_header(**header), **parts).SerializeToString()
    return "PooledBackward", pb.PooledBackwardRequest(header=push_header(**header), **parts).SerializeToString()


KINDS = ["gather", "pooled", "push", "backward"]
FLOAT_FIELDS = {"pooled": ["scores"], "push": ["grads"], "backward": ["scores", "grad_out"]}
HUGE_SHAPES = [[1 << 40], [1 << 40, 8], [1 << 61, 8], [1 << 32, 1 << 32], [1 << 62, 4], [-1, 8],
               [(1 << 63) - 1], [1 << 20, 1 << 20, 1 << 24], [3, -8]]
NONFINITE = [np.nan, np.inf, -np.inf]
BAD_ROW = st.one_of(st.integers(-(1 << 63), -1), st.integers(SPEC.rows, (1 << 63) - 1))
TABLE_NAME = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(lambda t: t != "mem")


@st.composite
def defective(draw) -> tuple[str, str, bytes, set[grpc.StatusCode]]:
    """(class, method, body, expected codes): a request with exactly one defect."""
    cls = draw(st.sampled_from(["huge_dims", "bad_rows", "nonfinite", "dtype_mismatch", "wrong_shape",
                                "unknown_table", "empty_table", "stale_epoch", "bad_seq", "bad_step", "bad_lr",
                                "bad_pooled", "too_many_rows", "foreign_rows", "duplicate_seq"]))
    writes = cls in ("bad_seq", "bad_step", "bad_lr", "duplicate_seq")
    kind = draw(st.sampled_from(["push", "backward"] if writes or cls == "nonfinite" else
                                ["pooled", "backward"] if cls == "bad_pooled" else KINDS))
    parts, header, expected = draw(valid_parts(kind)), {}, BAD
    if cls == "huge_dims":
        name = draw(st.sampled_from(["rows", *FLOAT_FIELDS.get(kind, [])]))
        dtype = pb.INT64 if name == "rows" else pb.FLOAT32
        parts[name] = tensor(dtype, draw(st.sampled_from(HUGE_SHAPES)), draw(st.binary(max_size=64)))
    elif cls == "bad_rows":
        rows = wire.decode_ids(parts["rows"], "rows").tolist()
        rows[draw(st.integers(0, len(rows) - 1))] = draw(BAD_ROW)
        parts["rows"] = wire.encode(np.array(rows, np.int64))
    elif cls == "nonfinite":
        name = draw(st.sampled_from(FLOAT_FIELDS[kind]))
        arr = wire.decode(parts[name], name, allowed=("float32",)).copy()
        arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(NONFINITE))
        parts[name] = wire.encode(arr, draw(st.sampled_from(wire.VALUE_DTYPES)))
    elif cls == "dtype_mismatch":
        name = draw(st.sampled_from(["rows", *FLOAT_FIELDS.get(kind, []), "wire_dtype"]))
        if name == "wire_dtype":
            if kind not in ("gather", "pooled"):
                name = "rows"
            else:
                parts["wire_dtype"] = draw(st.sampled_from([pb.INT64, pb.INT32, 6, 77, 1 << 20]))
        if name == "rows":
            ids = wire.decode_ids(parts["rows"], "rows")
            parts["rows"] = wire.encode(ids, draw(st.sampled_from(["float32", "float16", "bfloat16"])))
        elif name != "wire_dtype":
            old = parts[name]
            enum = draw(st.sampled_from([pb.INT64, pb.INT32, pb.DTYPE_UNSPECIFIED, 9, 1000]))
            parts[name] = tensor(enum, list(old.shape), old.data)
    elif cls == "wrong_shape":
        name = draw(st.sampled_from(["rows", *FLOAT_FIELDS.get(kind, [])]))
        old = parts[name]
        size = int(np.prod(old.shape))
        shape = draw(st.sampled_from([[size], [1, size], [size, 1, 1], [size // 2, 2] if size % 2 == 0 else [size, 3]]))
        if name == "rows":
            shape = shape if len(shape) != 1 else [1, size]
        elif name == "grads":
            shape = shape if len(shape) == 2 and shape[1] != 8 or len(shape) != 2 else [size // 8, 8, 1]
        else:  # scores / grad_out: element count changes, so rows and scores disagree
            shape = [size + 1] + list(old.shape[1:])
        itemsize = 8 if name == "rows" else 4
        parts[name] = tensor(old.dtype, shape, bytes(int(np.prod(shape)) * itemsize) if min(shape) > 0 else b"")
    elif cls == "unknown_table":
        header["table"], expected = draw(TABLE_NAME), {C.NOT_FOUND}
    elif cls == "empty_table":
        header["table"] = ""
    elif cls == "stale_epoch":
        header["epoch"], expected = draw(st.integers(1, EPOCH - 1)), {C.FAILED_PRECONDITION}
    elif cls == "bad_seq":
        header["seq"] = 0
    elif cls == "bad_step":
        header["step"] = draw(st.integers(-(1 << 63), -2))
    elif cls == "bad_lr":
        header["lr"] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -1e-3, -1e30]))
    elif cls == "bad_pooled":
        what = draw(st.sampled_from(["projector", "num_projectors", "h", "token", "touched"]))
        n = len(wire.decode_ids(parts["rows"], "rows"))
        if what == "projector":
            parts["projector"] = wire.encode(np.full(n, draw(st.sampled_from([-1, 3, 1 << 40])), np.int64))
        elif what == "num_projectors":
            parts["num_projectors"] = 0
        elif what == "h":
            parts["scores"] = wire.encode(np.ones((n, draw(st.sampled_from([3, 5, 7]))), np.float32))
        elif what == "token":
            parts["token"] = wire.encode(np.full(n, -1, np.int64))
        else:
            kind = "backward"
            parts = draw(valid_parts("backward"))
            touched = wire.decode_ids(parts["tokens_touched"], "t")
            parts["tokens_touched"] = wire.encode(touched[::-1] if touched.size > 1 else touched + 10)
    elif cls == "too_many_rows":
        n = draw(st.integers(MAX_ROWS + 1, 3 * MAX_ROWS))
        kind, parts, expected = "gather", {"rows": wire.encode(np.zeros(n, np.int64))}, {C.RESOURCE_EXHAUSTED}
    elif cls == "foreign_rows":
        kind, expected = "gather", {C.FAILED_PRECONDITION}
        parts = {"rows": wire.encode(np.array(draw(st.lists(st.sampled_from(FOREIGN_ROWS), min_size=1)), np.int64))}
    elif cls == "duplicate_seq":
        header["seq"], expected = draw(st.integers(1, LAST_SEQ)), {C.OK}
    return (cls, *build(kind, parts, header), expected)


HOSTILE_DIRS = ["", "/", "/etc", "/tmp", "..", "../outside", "../../../../etc/t", "link", "link/mem", "./../ckpt/..",
                "file", "empty", "nope", "a" * 300, "x/" * 600, "a\x00b", "\x00", "empty/../../outside", "~",
                "/proc/self/cwd", "ckpt", "."]


@st.composite
def checkpoint_path(draw) -> tuple[str, str, bytes, set[grpc.StatusCode]]:
    """A Checkpoint request naming a hostile, missing or unusable tables_dir."""
    how = draw(st.sampled_from(["listed", "joined", "text"]))
    if how == "listed":
        name = draw(st.sampled_from(HOSTILE_DIRS))
    elif how == "joined":
        name = "/".join(draw(st.lists(st.sampled_from(["..", ".", "link", "empty", "file", "outside", "ckpt", ""]),
                                      min_size=1, max_size=8)))
        name = ("/" if draw(st.booleans()) else "") + name
    else:
        name = draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
    return "checkpoint_path", "Checkpoint", pb.CheckpointRequest(tables_dir=name).SerializeToString(), CHECKPOINT_CODES


# --- mutations of serialized requests ----------------------------------------------------------

ANY_ANSWER = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}


def _nan_bases() -> list[tuple[str, bytes]]:
    """Serialized requests to mutate: valid lookups, and pushes whose gradients are all NaN."""
    rows = wire.encode(np.array([0, 1, 6], np.int64))
    nan = np.full((3, 8), np.nan, np.float32)
    three = {"projector": wire.encode(np.zeros(3, np.int64)), "token": wire.encode(np.array([0, 0, 1])),
             "num_projectors": 1}
    return [
        build("gather", {"rows": rows, "wire_dtype": pb.BFLOAT16}, {}),
        ("GatherStream", pb.GatherRequest(header=lookup_header(), rows=rows, rows_per_answer=2).SerializeToString()),
        build("pooled", {"rows": rows, "scores": wire.encode(np.ones((3, 2), np.float32)), **three}, {}),
        build("push", {"rows": rows, "grads": wire.encode(nan)}, {"seq": 500}),
        build("backward", {"rows": rows, "scores": wire.encode(np.full((3, 2), np.nan, np.float32)),
                           "grad_out": wire.encode(np.full((2, 1, 8), np.nan, np.float32)),
                           "tokens_touched": wire.encode(np.array([0, 1])), **three}, {"seq": 500}),
    ]


@st.composite
def mutated(draw) -> tuple[str, str, bytes, set[grpc.StatusCode]]:
    method, body = draw(st.sampled_from(_nan_bases()))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
    if how == "truncate":
        body = body[:draw(st.integers(0, len(body) - 1))]
    elif how == "flip":
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1:]
    elif how == "insert":
        i = draw(st.integers(0, len(body)))
        body = body[:i] + draw(st.binary(min_size=1, max_size=16)) + body[i:]
    else:
        body = body + draw(st.binary(min_size=1, max_size=32))
    expected = ANY_ANSWER | ({C.DEADLINE_EXCEEDED} if method in READS else set())  # a min_step may appear
    return f"mutated_{how}", method, body, expected


# --- the test ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_ten_thousand_hostile_requests_get_proper_codes_and_change_nothing() -> None:
    target = Target()
    try:
        before = snapshot(target.shard)

        @settings(max_examples=2500, **SETTINGS)
        @given(method=st.sampled_from(METHODS), body=st.binary(max_size=300))
        def random_bytes(method: str, body: bytes) -> None:
            expected = ANY_ANSWER if method in READS else ANY_ANSWER - {C.OK}
            target.send("random_bytes", method, body, CHECKPOINT_CODES if method == "Checkpoint" else expected)

        @settings(max_examples=6500, **SETTINGS)
        @given(case=defective())
        def one_defect(case) -> None:
            target.send(*case)

        @settings(max_examples=1500, **SETTINGS)
        @given(case=mutated())
        def mutations(case) -> None:
            target.send(*case)

        @settings(max_examples=600, **SETTINGS)
        @given(case=checkpoint_path())
        def checkpoint_paths(case) -> None:
            target.send(*case)

        outside = target.outside()
        for run in (random_bytes, one_defect, mutations, checkpoint_paths):
            run()
        assert target.outside() == outside  # Checkpoint wrote nothing outside its directory
        for size in (1 << 20, 3 << 20):  # over the server's 1 MiB message limit
            body = build("gather", {"rows": wire.encode(np.zeros(size // 8, np.int64))}, {})[1]
            target.send("oversize_message", "Gather", body, {C.RESOURCE_EXHAUSTED})
        total = sum(COUNTS.values())
        print(f"\nfuzz: {total} requests")
        for (cls, code), count in sorted(COUNTS.items()):
            print(f"  {cls:<22} {code:<20} {count}")
        assert total >= 10_000
        assert {cls for cls, _ in COUNTS} >= {"random_bytes", "huge_dims", "bad_rows", "nonfinite",
                                              "dtype_mismatch", "mutated_truncate", "duplicate_seq", "checkpoint_path"}
        assert {code for cls, code in COUNTS if cls == "checkpoint_path"} == {"INVALID_ARGUMENT", "NOT_FOUND",
                                                                              "PERMISSION_DENIED"}

        assert snapshot(target.shard) == before  # values, optimizer state, clocks, seqs
        values = target.shard.export_partitions("mem")
        reply = target.calls["Gather"](build("gather", {"rows": wire.encode(np.array([10, 1]))}, {})[1],
                                       timeout=DEADLINE_S)
        got = wire.parse_tensor_field(reply, 1, "values", allowed=("float32",), ndim=2, trailing=(2, 8))
        np.testing.assert_array_equal(got, np.stack([values[2]["values"][2], values[1]["values"][0]]))
        push = build("push", {"rows": wire.encode(np.array([1])), "grads": wire.encode(np.ones((1, 8), np.float32))},
                     {"seq": LAST_SEQ + 1, "step": LAST_STEP + 1})[1]
        assert pb.PushGradientsResponse.FromString(target.calls["PushGradients"](push, timeout=DEADLINE_S)).accepted
        target.shard.drain()
        assert target.shard.applied_step(1, "mem") == LAST_STEP + 1
    finally:
        target.close()
