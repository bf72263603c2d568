from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
INT64: DType
INT32: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LookupHeader(_message.Message):
    __slots__ = ("table", "epoch", "worker_id", "min_step")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    table: str
    epoch: int
    worker_id: int
    min_step: int
    def __init__(self, table: _Optional[str] = ..., epoch: _Optional[int] = ..., worker_id: _Optional[int] = ..., min_step: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("table", "epoch", "worker_id", "seq", "step", "lr")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    table: str
    epoch: int
    worker_id: int
    seq: int
    step: int
    lr: float
    def __init__(self, table: _Optional[str] = ..., epoch: _Optional[int] = ..., worker_id: _Optional[int] = ..., seq: _Optional[int] = ..., step: _Optional[int] = ..., lr: _Optional[float] = ...) -> None: ...

class GatherRequest(_message.Message):
    __slots__ = ("header", "rows", "wire_dtype", "rows_per_answer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_ANSWER_FIELD_NUMBER: _ClassVar[int]
    header: LookupHeader
    rows: Tensor
    wire_dtype: DType
    rows_per_answer: int
    def __init__(self, header: _Optional[_Union[LookupHeader, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., rows_per_answer: _Optional[int] = ...) -> None: ...

class GatherResponse(_message.Message):
    __slots__ = ("values", "applied_step")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    applied_step: int
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ..., applied_step: _Optional[int] = ...) -> None: ...

class PooledGatherRequest(_message.Message):
    __slots__ = ("header", "rows", "projector", "token", "scores", "num_projectors", "wire_dtype", "pre_table", "q_p", "tokens_touched")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PROJECTOR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    NUM_PROJECTORS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PRE_TABLE_FIELD_NUMBER: _ClassVar[int]
    Q_P_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOUCHED_FIELD_NUMBER: _ClassVar[int]
    header: LookupHeader
    rows: Tensor
    projector: Tensor
    token: Tensor
    scores: Tensor
    num_projectors: int
    wire_dtype: DType
    pre_table: str
    q_p: Tensor
    tokens_touched: Tensor
    def __init__(self, header: _Optional[_Union[LookupHeader, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., projector: _Optional[_Union[Tensor, _Mapping]] = ..., token: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., num_projectors: _Optional[int] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., pre_table: _Optional[str] = ..., q_p: _Optional[_Union[Tensor, _Mapping]] = ..., tokens_touched: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PooledGatherResponse(_message.Message):
    __slots__ = ("tokens", "sums", "applied_step")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    tokens: Tensor
    sums: Tensor
    applied_step: int
    def __init__(self, tokens: _Optional[_Union[Tensor, _Mapping]] = ..., sums: _Optional[_Union[Tensor, _Mapping]] = ..., applied_step: _Optional[int] = ...) -> None: ...

class PushGradientsRequest(_message.Message):
    __slots__ = ("header", "rows", "grads")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    rows: Tensor
    grads: Tensor
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("accepted", "last_seq")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    last_seq: int
    def __init__(self, accepted: _Optional[bool] = ..., last_seq: _Optional[int] = ...) -> None: ...

class PooledBackwardRequest(_message.Message):
    __slots__ = ("header", "rows", "projector", "token", "scores", "grad_out", "tokens_touched", "num_projectors", "min_step", "pre_table", "q_p")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PROJECTOR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOUCHED_FIELD_NUMBER: _ClassVar[int]
    NUM_PROJECTORS_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    PRE_TABLE_FIELD_NUMBER: _ClassVar[int]
    Q_P_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    rows: Tensor
    projector: Tensor
    token: Tensor
    scores: Tensor
    grad_out: Tensor
    tokens_touched: Tensor
    num_projectors: int
    min_step: int
    pre_table: str
    q_p: Tensor
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., projector: _Optional[_Union[Tensor, _Mapping]] = ..., token: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., grad_out: _Optional[_Union[Tensor, _Mapping]] = ..., tokens_touched: _Optional[_Union[Tensor, _Mapping]] = ..., num_projectors: _Optional[int] = ..., min_step: _Optional[int] = ..., pre_table: _Optional[str] = ..., q_p: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PooledBackwardResponse(_message.Message):
    __slots__ = ("grad_scores", "accepted", "grad_q_p")
    GRAD_SCORES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    GRAD_Q_P_FIELD_NUMBER: _ClassVar[int]
    grad_scores: Tensor
    accepted: bool
    grad_q_p: Tensor
    def __init__(self, grad_scores: _Optional[_Union[Tensor, _Mapping]] = ..., accepted: _Optional[bool] = ..., grad_q_p: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "rows", "dim", "dtype", "num_partitions", "optimizer", "partitions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    dim: int
    dtype: str
    num_partitions: int
    optimizer: str
    partitions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., num_partitions: _Optional[int] = ..., optimizer: _Optional[str] = ..., partitions: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("shard_id", "epoch", "read_only", "tables", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    epoch: int
    read_only: bool
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, shard_id: _Optional[int] = ..., epoch: _Optional[int] = ..., read_only: _Optional[bool] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetPartitionMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PartitionMap(_message.Message):
    __slots__ = ("epoch", "num_partitions", "owner", "addresses")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    num_partitions: int
    owner: _containers.RepeatedScalarFieldContainer[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, epoch: _Optional[int] = ..., num_partitions: _Optional[int] = ..., owner: _Optional[_Iterable[int]] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("tables_dir",)
    TABLES_DIR_FIELD_NUMBER: _ClassVar[int]
    tables_dir: str
    def __init__(self, tables_dir: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("tables", "partitions")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    partitions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., partitions: _Optional[_Iterable[int]] = ...) -> None: ...
