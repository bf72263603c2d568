"""The MemoryShard gRPC servicer: decode, call one `Shard` method, encode (DESIGN §4.2, STYLE §12).

Each RPC validates the wire form at the edge (dtype, rank, trailing dims, byte length via
`param_server.wire`), checks the partition-map epoch the client routed with, calls exactly one
`Shard` method (which validates row range, finiteness, ownership before mutating anything) and
encodes the answer. Typed errors leave as status codes through the one table in
`param_server.errors`; a FAILED_PRECONDITION also carries the current epoch in the trailing
metadata key `ultramem-epoch`, so a client knows whether refreshing its map helps.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import numpy as np

from param_server import wire
from param_server.errors import (
    InvalidRequestError,
    PathNotFoundError,
    PermissionDeniedError,
    ShardError,
    StaleEpochError,
    status_code_name,
)
from param_server.partition_map import PartitionMap
from protos.ultramem.v1 import memory_pb2 as pb
from protos.ultramem.v1 import memory_pb2_grpc as pb_grpc
from storage.errors import StorageError

if TYPE_CHECKING:
    from param_server.shard import Shard

logger = logging.getLogger(__name__)

EPOCH_METADATA_KEY = "ultramem-epoch"
F = TypeVar("F", bound=Callable[..., Any])


def _abort(servicer: MemoryShardServicer, name: str, err: Exception, context: grpc.ServicerContext) -> NoReturn:
    """End the call with the status code of `err` (the one table in param_server.errors)."""
    if isinstance(err, ShardError):
        code = grpc.StatusCode[status_code_name(err)]
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            epoch = err.epoch if isinstance(err, StaleEpochError) else servicer.partition_map().epoch
            context.set_trailing_metadata(((EPOCH_METADATA_KEY, str(epoch)),))
        logger.debug("%s -> %s: %s", name, code.name, err)
        context.abort(code, f"{type(err).__name__}: {err}")
    logger.error("%s failed", name, exc_info=err)  # a bug of ours: say so, keep serving
    context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


def _rpc(method: F) -> F:
    """Turn typed errors of one RPC into status codes."""

    @functools.wraps(method)
    def wrapper(self: MemoryShardServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as err:
            _abort(self, method.__name__, err, context)

    return wrapper  # type: ignore[return-value]


def _rpc_stream(method: F) -> F:
    """`_rpc` for a server-streaming RPC: errors raised while answering end the stream with their code."""

    @functools.wraps(method)
    def wrapper(self: MemoryShardServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as err:
            _abort(self, method.__name__, err, context)

    return wrapper  # type: ignore[return-value]


_MAX_PATH_CHARS = 1024


def confined_dir(base: Path, name: str) -> Path:
    """The existing directory `name` (relative to `base`, or absolute) if it lies inside `base`.

    Raises:
        InvalidRequestError: empty, too long, a NUL byte, or a name the filesystem rejects.
        PermissionDeniedError: it resolves (symlinks followed) outside `base`.
        PathNotFoundError: inside `base` but not an existing directory.
    """
    if not name:
        raise InvalidRequestError("empty request: no tables_dir")
    if len(name) > _MAX_PATH_CHARS or "\x00" in name:
        raise InvalidRequestError(f"tables_dir must be a path of at most {_MAX_PATH_CHARS} characters without NUL")
    try:
        path = (base / name).resolve()  # an absolute `name` replaces base; symlinks are followed
        inside = path == base or path.is_relative_to(base)
        is_dir = inside and path.is_dir()
    except (OSError, RuntimeError, ValueError) as err:  # name too long, symlink loop
        raise InvalidRequestError(f"tables_dir {name[:80]!r} is not a usable path: {err}") from None
    if not inside:
        raise PermissionDeniedError(f"tables_dir {name[:80]!r} is outside this shard's checkpoint directory")
    if not is_dir:
        raise PathNotFoundError(f"tables_dir {name[:80]!r} is not a directory in this shard's checkpoint directory")
    return path


def _min_step(header: pb.LookupHeader) -> int | None:
    return header.min_step if header.HasField("min_step") else None


def _require(request: Any, *fields: str) -> None:
    """An empty (or half-filled) request is INVALID_ARGUMENT, named field by field."""
    missing = [f for f in fields if not request.HasField(f)]
    if missing:
        raise InvalidRequestError(f"empty request: missing {', '.join(missing)}")


class MemoryShardServicer(pb_grpc.MemoryShardServicer):
    """Serves one `Shard`; holds the partition map this shard answers with and checks epochs against."""

    def __init__(self, shard: Shard, partition_map: PartitionMap | None = None, address: str = "",
                 checkpoint_dir: str | Path | None = None) -> None:
        """checkpoint_dir: the only directory the Checkpoint RPC may write under (None: the RPC is refused)."""
        self._shard = shard
        self._checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir is not None else None
        self._map = partition_map
        self._address = address
        self._lock = threading.Lock()

    # -- partition map -------------------------------------------------------------------------
    def set_address(self, address: str) -> None:
        """The host:port this shard is reachable at (used by the default map)."""
        self._address = address

    def set_partition_map(self, partition_map: PartitionMap) -> None:
        """Install a new map (the coordinator does this on rescale); older epochs become stale."""
        with self._lock:
            self._map = partition_map

    def partition_map(self) -> PartitionMap:
        """The installed map, or (standalone shard) one built from what this shard owns, epoch 0."""
        with self._lock:
            if self._map is not None:
                return self._map
        names = self._shard.table_names()
        nps = {self._shard.spec(t).num_partitions for t in names}
        if len(nps) != 1:
            raise InvalidRequestError(f"no single partition count to map: tables {names} have {sorted(nps)}")
        owned = set()
        for t in names:
            owned.update(self._shard.owned_partitions(t))
        return PartitionMap.from_owned([self._address], [sorted(owned)], nps.pop(), epoch=0)

    def _check_epoch(self, epoch: int) -> None:
        if epoch == 0:  # a client that does not route by a map (a single-shard tool, grpcurl)
            return
        current = self.partition_map().epoch
        if epoch < current:
            raise StaleEpochError(f"request routed with partition-map epoch {epoch}, current is {current}", current)

    def _dim(self, table: str) -> int:
        if not table:
            raise InvalidRequestError("empty request: no table name")
        return self._shard.spec(table).dim

    # -- lookups -------------------------------------------------------------------------------
    @_rpc
    def Gather(self, request: pb.GatherRequest, context: grpc.ServicerContext) -> bytes:
        """Answers a serialized GatherResponse (the server passes bytes through; wire.py fast path)."""
        header, rows, out_dtype = self._gather_inputs(request)
        return self._gather_answer(header, rows, out_dtype)

    @_rpc_stream
    def GatherStream(self, request: pb.GatherRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Gather's answers for `rows_per_answer` rows at a time, in request order. The whole request
        is validated before the first answer; each answer is read when it is sent, as separate
        Gather calls would read it."""
        header, rows, out_dtype = self._gather_inputs(request)
        self._shard.check_lookup(header.table, rows)
        per = int(request.rows_per_answer) or rows.size
        for a in range(0, rows.size, per):
            yield self._gather_answer(header, rows[a:a + per], out_dtype)

    def _gather_inputs(self, request: pb.GatherRequest) -> tuple[pb.LookupHeader, np.ndarray, str]:
        _require(request, "header", "rows")
        header = request.header
        self._dim(header.table)
        self._check_epoch(header.epoch)
        return header, wire.decode_ids(request.rows, "rows"), self._value_dtype(request.wire_dtype)

    def _gather_answer(self, header: pb.LookupHeader, rows: np.ndarray, out_dtype: str) -> bytes:
        values = self._shard.gather(header.table, rows, worker_id=header.worker_id, min_step=_min_step(header))
        applied = self._shard.applied_step(header.worker_id, header.table)
        # == GatherResponse(values=..., applied_step=...) serialized, in one copy
        return b"".join([*wire.tensor_field_bytes(1, values, out_dtype), wire.varint_field_bytes(2, applied)])

    @_rpc
    def PooledGather(self, request: pb.PooledGatherRequest, context: grpc.ServicerContext) -> bytes:
        """Answers a serialized PooledGatherResponse (as Gather: no message object, one copy of the sums)."""
        _require(request, "header", "rows", "projector", "token", "scores")
        header = request.header
        self._dim(header.table)
        self._check_epoch(header.epoch)
        rows, projector, token, scores = self._pooled_inputs(request)
        out_dtype = self._value_dtype(request.wire_dtype)
        pre_table, q_p = self._pre_inputs(request)
        touched = wire.decode_ids(request.tokens_touched, "tokens_touched") if request.HasField("tokens_touched") \
            else None
        tokens, sums = self._shard.pooled_gather(
            header.table, rows, projector, token, scores, int(request.num_projectors),
            worker_id=header.worker_id, min_step=_min_step(header), pre_table=pre_table, q_p=q_p,
            tokens_touched=touched,
        )
        applied = self._shard.applied_step(header.worker_id, header.table)
        return b"".join([*wire.tensor_field_bytes(1, tokens, "int64"), *wire.tensor_field_bytes(2, sums, out_dtype),
                         wire.varint_field_bytes(3, applied)])

    # -- pushes --------------------------------------------------------------------------------
    @_rpc
    def PushGradients(
        self, request: pb.PushGradientsRequest, context: grpc.ServicerContext
    ) -> pb.PushGradientsResponse:
        _require(request, "header", "rows", "grads")
        h = request.header
        dim = self._dim(h.table)
        self._check_epoch(h.epoch)
        rows = wire.decode_ids(request.rows, "rows")
        grads = wire.decode_values(request.grads, "grads", ndim=2, trailing=(dim,))
        if grads.shape[0] != rows.shape[0]:
            raise InvalidRequestError(f"grads has {grads.shape[0]} rows, rows has {rows.shape[0]}")
        accepted = self._shard.push(h.table, h.worker_id, h.seq, h.step, h.lr, rows, grads)
        return pb.PushGradientsResponse(accepted=accepted, last_seq=self._shard.last_seq(h.worker_id))

    @_rpc
    def PooledBackward(
        self, request: pb.PooledBackwardRequest, context: grpc.ServicerContext
    ) -> pb.PooledBackwardResponse:
        _require(request, "header", "rows", "projector", "token", "scores", "grad_out", "tokens_touched")
        h = request.header
        dim = self._dim(h.table)
        self._check_epoch(h.epoch)
        rows, projector, token, scores = self._pooled_inputs(request)
        num_projectors = int(request.num_projectors)
        grad_out = wire.decode_values(request.grad_out, "grad_out", ndim=3, trailing=(num_projectors, dim))
        touched = wire.decode_ids(request.tokens_touched, "tokens_touched")
        min_step = request.min_step if request.HasField("min_step") else None
        pre_table, q_p = self._pre_inputs(request)
        if pre_table is None and q_p is None:  # exactly the v1 backward
            grad_scores, accepted = self._shard.pooled_backward_with_ack(
                h.table, h.worker_id, h.seq, h.step, h.lr, rows, projector, token, scores,
                grad_out, touched, num_projectors, min_step=min_step,
            )
            return pb.PooledBackwardResponse(grad_scores=wire.encode(grad_scores, "float32"), accepted=accepted)
        if pre_table is None or q_p is None:
            raise InvalidRequestError("pre-values need pre_table and q_p together")
        grad_scores, grad_q_p, accepted = self._shard.pooled_backward_pre(
            h.table, pre_table, h.worker_id, h.seq, h.step, h.lr, rows, projector, token, scores, q_p,
            grad_out, touched, num_projectors, min_step=min_step,
        )
        return pb.PooledBackwardResponse(grad_scores=wire.encode(grad_scores, "float32"), accepted=accepted,
                                         grad_q_p=wire.encode(grad_q_p, "float32"))

    # -- control -------------------------------------------------------------------------------
    @_rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        tables = []
        for name in self._shard.table_names():
            spec = self._shard.spec(name)
            tables.append(pb.TableInfo(
                name=name, rows=spec.rows, dim=spec.dim, dtype=spec.dtype, num_partitions=spec.num_partitions,
                optimizer=spec.optimizer, partitions=self._shard.owned_partitions(name),
            ))
        metrics = {k: float(v) for k, v in self._shard.metrics().items()}
        return pb.InfoResponse(
            shard_id=self._shard.shard_id, epoch=self.partition_map().epoch if tables else 0,
            read_only=self._shard.config.read_only, tables=tables, metrics=metrics,
        )

    @_rpc
    def GetPartitionMap(self, request: pb.GetPartitionMapRequest, context: grpc.ServicerContext) -> pb.PartitionMap:
        pmap = self.partition_map()
        return pb.PartitionMap(
            epoch=pmap.epoch, num_partitions=pmap.num_partitions, owner=pmap.owner.tolist(), addresses=pmap.addresses
        )

    @_rpc
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        if self._checkpoint_dir is None:
            raise PermissionDeniedError("Checkpoint is off on this shard: a training job checkpoints its shards "
                                        "through Ray; `ultramem shard serve --checkpoint-dir DIR` allows it under DIR")
        root = confined_dir(self._checkpoint_dir, request.tables_dir)
        for name in self._shard.table_names():  # check all, then write: a missing group changes nothing
            if not (root / name / "zarr.json").is_file():
                raise PathNotFoundError(f"no table group {name!r} in tables_dir {request.tables_dir!r}")
        self._shard.drain()
        try:
            self._shard.save(root)
        except PermissionError as err:
            raise PermissionDeniedError(f"cannot write into tables_dir {request.tables_dir!r}: {err.strerror}"
                                        ) from None
        except (StorageError, FileNotFoundError) as err:
            raise PathNotFoundError(f"tables_dir {request.tables_dir!r}: {err}") from None
        names = self._shard.table_names()
        parts = sorted({p for t in names for p in self._shard.owned_partitions(t)})
        return pb.CheckpointResponse(tables=names, partitions=parts)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _value_dtype(enum: int) -> str:
        name = wire.dtype_name(enum, default="float32")
        if name not in wire.VALUE_DTYPES:
            raise InvalidRequestError(f"wire_dtype {name} is not a value dtype; expected one of {wire.VALUE_DTYPES}")
        return name

    @staticmethod
    def _pre_inputs(request: Any) -> tuple[str | None, np.ndarray | None]:
        """(pre_table or None, q_p float32 [Tq, d_p] or None) of a pooled request (DESIGN §3.3): only
        FLOAT32 q_p; its width, finiteness and the table pairing are the shard's checks."""
        q_p = wire.decode(request.q_p, "q_p", allowed=("float32",), ndim=2) if request.HasField("q_p") else None
        return request.pre_table or None, q_p

    @staticmethod
    def _pooled_inputs(request: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = wire.decode_ids(request.rows, "rows")
        projector = wire.decode_ids(request.projector, "projector")
        token = wire.decode_ids(request.token, "token")
        scores = wire.decode_values(request.scores, "scores", ndim=2)
        n = rows.shape[0]
        if projector.shape[0] != n or token.shape[0] != n or scores.shape[0] != n:
            raise InvalidRequestError(
                f"rows, projector, token, scores must have one entry each: got {n}, {projector.shape[0]}, "
                f"{token.shape[0]}, {scores.shape[0]}"
            )
        return rows, projector, token, scores
