"""The Zarr v3 layout of one memory table: the only module that knows it (DESIGN §4.1, §5).

A table with P rows, value width d_v and NP partitions is one Zarr v3 group::

    <table>/zarr.json                 group; attributes["ultramem"] = the table spec (below)
    <table>/values/                   [NP, R, d_v], R = ceil(P / NP); row r -> [r % NP, r // NP]
    <table>/<state>/                  optimizer state, [NP, R, ...] (OPTIMIZER_STATE below)

Rows and partitions (DESIGN §4.1): row r lives in partition r % NP at local row r // NP.
Partitions whose last local row would be >= P carry one **padding row** (always 0, never used).

Chunks never straddle partitions: every array is chunked (1, chunk_rows, *trailing) with
chunk_rows <= R, sized so one chunk holds about 2 MiB (`DEFAULT_TARGET_CHUNK_BYTES`), so every
Zarr object (chunk file) is written by exactly one partition owner (DESIGN §5: concurrent writers
to one chunk silently lose data). The sharding codec is not used: zarr-python 3.1 cannot write an
orthogonal row subset into a sharded array (DESIGN §8). `values` are stored uncompressed (trained
floats barely compress, and decompression halves read speed); optimizer state, mostly zeros early
on, uses zstd level 1, except in work tables served beyond RAM (`table_arrays(spec,
compress_state=False)`): there every array is plain `bytes` (little-endian), so the chunk cache
reads and writes chunk files in place (storage/chunk_io.py, the raw engine). The codec chain is in
each array's own zarr.json, so readers need no flag. Every array has fill value 0, so state arrays
need no initial writes.

Group attributes, under the key "ultramem" (`ATTRIBUTE_KEY`): every `TableSpec` field (`name`,
`rows` = P, `dim` = d_v, `dtype`, `num_partitions` = NP, `optimizer`, `optimizer_args` (an
object), `init_std`, `seed`, `version`) plus the derived, informative `kind`,
`rows_per_partition`, `row_mapping` and `storage_dtype`.

**bfloat16.** zarr-python 3.1 has no bfloat16 data type. A bfloat16 table stores `values` as
Zarr `uint16` holding the raw bfloat16 bit pattern (the upper 16 bits of the float32). The group
attribute `ultramem.dtype` is then "bfloat16", `ultramem.storage_dtype.values` is "uint16", and the
`values` array repeats `attributes["ultramem"]["dtype"] = "bfloat16"`. Our reader returns
`ml_dtypes.bfloat16` arrays (`bits.view(ml_dtypes.bfloat16)`); any other Zarr v3 reader gets the
uint16 bits and recovers the floats with `(bits.astype(uint32) << 16).view(float32)`.
float32 and float16 tables are stored as the native Zarr dtypes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from storage.errors import LayoutError

LAYOUT_VERSION = 1  # the newest table layout this code reads and writes (TableSpec.version)
ATTRIBUTE_KEY = "ultramem"  # group and array attributes live under this key
TABLE_KIND = "ultramem.table"
VALUES = "values"  # name of the value array
DEFAULT_TARGET_CHUNK_BYTES = 2 << 20  # ~2 MiB per chunk: few chunk ops (~1 ms each, DESIGN §8)
DIMENSION_NAMES = ("partition", "row", "dim")

DType = Literal["float32", "bfloat16", "float16"]
Optimizer = Literal["adamw", "adagrad", "sgd"]
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

# optimizer -> state array -> (trailing dims, "dim" = d_v; dtype). The single source of truth
# for optimizer state on disk and in a shard (DESIGN §4.4).
OPTIMIZER_STATE: dict[str, dict[str, tuple[tuple[int | str, ...], str]]] = {
    "sgd": {},
    "adagrad": {"sum_sq": ((), "float32")},  # row-wise: one float per row
    "adamw": {
        "exp_avg": (("dim",), "float32"),
        "exp_avg_sq": (("dim",), "float32"),
        "step": ((), "int32"),  # per-row step count for bias correction
    },
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_DERIVED_ATTRIBUTES = ("kind", "rows_per_partition", "row_mapping", "storage_dtype")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class TableSpec:
    """What a memory table is; stored in its group attributes and validated at construction."""

    name: str  # table name; also its directory name inside a checkpoint
    rows: int  # P physical rows
    dim: int  # d_v
    dtype: DType = "float32"  # values, in RAM and on disk (bfloat16: uint16 bits on disk)
    num_partitions: int = 256  # NP; row r lives in partition r % NP at local row r // NP
    optimizer: Optimizer = "adamw"  # sparse optimizer whose state is stored beside the rows
    optimizer_args: tuple[tuple[str, float], ...] = ()  # e.g. (("beta2", 0.95), ("weight_decay", 0.1))
    init_std: float = 0.02  # values start as N(0, init_std^2)
    seed: int = 0  # partition p is initialised from np.random.default_rng((seed, p))
    version: int = LAYOUT_VERSION  # table layout version

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise LayoutError(f"table name {self.name!r} must match {_NAME_RE.pattern}")
        for field_name in ("rows", "dim", "num_partitions"):
            value = getattr(self, field_name)
            if not _is_int(value) or value <= 0:
                raise LayoutError(f"table {self.name}: {field_name} must be a positive int, got {value!r}")
            object.__setattr__(self, field_name, int(value))
        if self.dtype not in DTYPES:
            raise LayoutError(f"table {self.name}: dtype {self.dtype!r} not in {DTYPES}")
        if self.optimizer not in OPTIMIZER_STATE:
            raise LayoutError(
                f"table {self.name}: optimizer {self.optimizer!r} not in {tuple(OPTIMIZER_STATE)}"
            )
        object.__setattr__(self, "optimizer_args", _normalise_args(self.name, self.optimizer_args))
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float, np.floating)):
            raise LayoutError(f"table {self.name}: init_std must be a float, got {self.init_std!r}")
        if not math.isfinite(self.init_std) or self.init_std < 0:
            raise LayoutError(f"table {self.name}: init_std must be finite and >= 0, got {self.init_std}")
        object.__setattr__(self, "init_std", float(self.init_std))
        if not _is_int(self.seed) or self.seed < 0:
            raise LayoutError(f"table {self.name}: seed must be an int >= 0, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        if not _is_int(self.version) or not 1 <= self.version <= LAYOUT_VERSION:
            raise LayoutError(
                f"table {self.name}: layout version {self.version!r} is not in 1..{LAYOUT_VERSION} "
                "(written by a newer ultramem?)"
            )

    @property
    def rows_per_partition(self) -> int:
        """R = ceil(P / NP): local rows of every partition (the last few hold one padding row)."""
        return -(-self.rows // self.num_partitions)

    def valid_rows(self, p: int) -> int:
        """Rows of partition p that exist (global row < P): R or R - 1 (0 when p >= P)."""
        check_partition(self, p)
        return max(0, -(-(self.rows - p) // self.num_partitions))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field; optimizer_args becomes an object."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["optimizer_args"] = dict(self.optimizer_args)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableSpec:
        """Inverse of `to_dict`; unknown keys raise LayoutError listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise LayoutError(f"unknown table spec keys {unknown}; valid keys: {valid}")
        kw = dict(d)
        args = kw.get("optimizer_args", ())
        if isinstance(args, Mapping):
            kw["optimizer_args"] = tuple(args.items())
        try:
            return cls(**kw)
        except TypeError as err:  # a missing required field
            raise LayoutError(f"incomplete table spec {dict(d)}: {err}") from err


def _normalise_args(name: str, args: object) -> tuple[tuple[str, float], ...]:
    try:
        pairs = [(k, v) for k, v in args]  # type: ignore[attr-defined]
    except (TypeError, ValueError) as err:
        raise LayoutError(f"table {name}: optimizer_args must be (name, float) pairs, got {args!r}") from err
    out: list[tuple[str, float]] = []
    for k, v in pairs:
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            raise LayoutError(f"table {name}: optimizer_args entry ({k!r}, {v!r}) is not (str, float)")
        out.append((k, float(v)))
    if len({k for k, _ in out}) != len(out):
        raise LayoutError(f"table {name}: optimizer_args has duplicate names: {args!r}")
    return tuple(out)


def check_partition(spec: TableSpec, p: object) -> int:
    """Return p as an int, or raise LayoutError unless 0 <= p < NP."""
    if not _is_int(p) or not 0 <= p < spec.num_partitions:  # type: ignore[operator]
        raise LayoutError(f"table {spec.name}: partition {p!r} not in [0, {spec.num_partitions})")
    return int(p)  # type: ignore[call-overload]


# --- dtypes ------------------------------------------------------------------------------------


@functools.cache
def bfloat16() -> np.dtype:
    """numpy's bfloat16 (`ml_dtypes.bfloat16`), imported on first use: loading its extension takes
    about a second, which every process that never meets a bfloat16 array (a float32 shard, a CLI
    call, a worker) would otherwise pay at start-up."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(name: str) -> np.dtype:
    """Logical numpy dtype of a dtype name ("bfloat16" -> ml_dtypes.bfloat16)."""
    if name == "bfloat16":
        return bfloat16()
    return np.dtype(name)


def storage_dtype(name: str) -> np.dtype:
    """The Zarr dtype that stores a logical dtype: bfloat16 bits go in uint16, others as is."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def to_storage(array: np.ndarray) -> np.ndarray:
    """View an array in its on-disk dtype (bfloat16 -> uint16 bits, no copy)."""
    dtype = array.dtype  # kind first: dtype.name costs ~10 us, and this runs once per chunk moved
    return array.view(np.uint16) if dtype.kind == "V" and dtype.name == "bfloat16" else array


def from_storage(array: np.ndarray, logical: np.dtype) -> np.ndarray:
    """View on-disk data in its logical dtype (uint16 bits -> bfloat16, no copy)."""
    return array.view(logical) if array.dtype != logical else array


# --- arrays ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayLayout:
    """One Zarr array of a table."""

    name: str  # array name inside the table group
    trailing: tuple[int, ...]  # shape after [NP, R]: (d_v,) or ()
    dtype: np.dtype  # logical dtype (what read/write speak)
    storage_dtype: np.dtype  # Zarr dtype on disk
    compressed: bool  # zstd level 1 if True, raw bytes otherwise

    def shape(self, spec: TableSpec) -> tuple[int, ...]:
        """Full array shape [NP, R, *trailing]."""
        return (spec.num_partitions, spec.rows_per_partition, *self.trailing)

    def chunks(
        self, spec: TableSpec, target_chunk_bytes: int = DEFAULT_TARGET_CHUNK_BYTES
    ) -> tuple[int, ...]:
        """Chunk shape (1, chunk_rows, *trailing): never straddles a partition."""
        row_bytes = math.prod(self.trailing) * self.storage_dtype.itemsize
        return (1, chunk_rows(row_bytes, spec.rows_per_partition, target_chunk_bytes), *self.trailing)

    def dimension_names(self) -> tuple[str, ...]:
        """Zarr dimension names, e.g. ("partition", "row", "dim")."""
        return DIMENSION_NAMES[: 2 + len(self.trailing)]


def chunk_rows(row_bytes: int, rows_per_partition: int, target_chunk_bytes: int) -> int:
    """Rows per chunk: as many as fit target_chunk_bytes, at least 1, at most R."""
    if target_chunk_bytes <= 0:
        raise LayoutError(f"target_chunk_bytes must be > 0, got {target_chunk_bytes}")
    return max(1, min(rows_per_partition, target_chunk_bytes // max(1, row_bytes)))


def state_layout(spec: TableSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Optimizer state arrays of a spec: name -> (resolved trailing shape, dtype)."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name, (dims, dtype) in OPTIMIZER_STATE[spec.optimizer].items():
        out[name] = (tuple(spec.dim if d == "dim" else int(d) for d in dims), np.dtype(dtype))
    return out


def table_arrays(spec: TableSpec, *, compress_state: bool = True) -> dict[str, ArrayLayout]:
    """Every array of a table, `values` first, then the optimizer state in OPTIMIZER_STATE order.

    compress_state: optimizer state in zstd (the default: checkpoints, resident tables); False for
    work tables served beyond RAM, whose chunks the raw engine rewrites in place (storage/chunk_io.py).
    Only `create_table` needs it: readers take the codecs from each array's metadata.
    """
    arrays = {
        VALUES: ArrayLayout(VALUES, (spec.dim,), numpy_dtype(spec.dtype), storage_dtype(spec.dtype), False)
    }
    for name, (trailing, dtype) in state_layout(spec).items():
        arrays[name] = ArrayLayout(name, trailing, dtype, dtype, compress_state)
    return arrays


# --- attributes --------------------------------------------------------------------------------


def table_attributes(spec: TableSpec) -> dict[str, Any]:
    """Group attributes of a table: {"ultramem": spec fields + derived, informative keys}."""
    return {
        ATTRIBUTE_KEY: {
            "kind": TABLE_KIND,
            **spec.to_dict(),
            "rows_per_partition": spec.rows_per_partition,
            "row_mapping": "row r is at [r % num_partitions, r // num_partitions]",
            "storage_dtype": {a.name: str(a.storage_dtype) for a in table_arrays(spec).values()},
        }
    }


def partition_file_filter(partitions: Iterable[int]) -> Callable[[str], bool]:
    """A predicate on file paths inside a table group (posix, relative to it): True for the group's
    and arrays' metadata and for the chunks of `partitions` (Zarr v3 default chunk keys
    `<array>/c/<partition>/...`; a chunk never straddles partitions, so each file has one)."""
    wanted = {str(int(p)) for p in partitions}

    def accept(rel: str) -> bool:
        parts = rel.split("/")
        if parts[-1] == "zarr.json":
            return True
        return len(parts) >= 3 and parts[1] == "c" and parts[2] in wanted

    return accept


def array_attributes(spec: TableSpec, array: ArrayLayout) -> dict[str, Any]:
    """Attributes of one array: its logical dtype (says "bfloat16" when the bits are uint16)."""
    logical = spec.dtype if array.name == VALUES else str(array.dtype)
    return {ATTRIBUTE_KEY: {"dtype": logical, "table": spec.name}}


def is_table_attributes(attrs: Mapping[str, Any]) -> bool:
    """True when group attributes mark an ultramem table."""
    meta = attrs.get(ATTRIBUTE_KEY)
    return isinstance(meta, Mapping) and meta.get("kind") == TABLE_KIND


def spec_from_attributes(attrs: Mapping[str, Any]) -> TableSpec:
    """The TableSpec stored in group attributes; LayoutError if missing or invalid."""
    if not is_table_attributes(attrs):
        raise LayoutError(f"attributes carry no {ATTRIBUTE_KEY!r} table spec of kind {TABLE_KIND}")
    meta = attrs[ATTRIBUTE_KEY]
    spec = TableSpec.from_dict({k: v for k, v in meta.items() if k not in _DERIVED_ATTRIBUTES})
    expected = table_attributes(spec)[ATTRIBUTE_KEY]
    for key in _DERIVED_ATTRIBUTES:
        if meta.get(key) != expected[key]:
            raise LayoutError(
                f"table {spec.name}: attribute {key}={meta.get(key)!r}, expected {expected[key]!r}"
            )
    return spec


# --- rows and initial values -------------------------------------------------------------------


def _rows(rows: np.ndarray | Any) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise LayoutError(f"row indices must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64, copy=False)
    if rows.size and rows.min() < 0:
        raise LayoutError("row indices must be >= 0")
    return rows


def _check_np(num_partitions: int) -> None:
    if not _is_int(num_partitions) or num_partitions <= 0:
        raise LayoutError(f"num_partitions must be a positive int, got {num_partitions!r}")


def partition_of(rows: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition of each global row: int64 [N] -> int64 [N], rows % NP."""
    _check_np(num_partitions)
    return _rows(rows) % num_partitions


def local_row_of(rows: np.ndarray, num_partitions: int) -> np.ndarray:
    """Local row of each global row inside its partition: int64 [N] -> int64 [N], rows // NP."""
    _check_np(num_partitions)
    return _rows(rows) // num_partitions


def global_row_of(partition: int | np.ndarray, local_rows: np.ndarray, num_partitions: int) -> np.ndarray:
    """Global row of (partition, local row): int64 [N] -> int64 [N], local * NP + partition."""
    _check_np(num_partitions)
    return _rows(local_rows) * num_partitions + _rows(partition)


def init_table_values(spec: TableSpec) -> np.ndarray:
    """The whole table's initial values [rows, d_v] in the spec dtype: partition p's
    `init_partition_values` at global rows p, p + NP, ... (what `create_table` writes)."""
    values = np.zeros((spec.rows, spec.dim), dtype=numpy_dtype(spec.dtype))
    for p in range(spec.num_partitions):
        values[p :: spec.num_partitions] = init_partition_values(spec, p)[: spec.valid_rows(p)]
    return values


def init_partition_values(spec: TableSpec, p: int) -> np.ndarray:
    """Initial values of partition p: [R, d_v] in the spec dtype, N(0, init_std^2), padding rows 0.

    Seeded by (spec.seed, p) only, so any process makes the same partition, in any order.
    """
    ((_, block),) = partition_value_blocks(spec, p, spec.rows_per_partition)
    return block


def partition_value_blocks(spec: TableSpec, p: int, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """`init_partition_values(spec, p)` in blocks: yields (first local row, values [<= block_rows, d_v]).

    The blocks concatenate to exactly `init_partition_values` (one generator drawn in sequence), so
    a writer holds one block, never a whole partition, in memory.
    """
    p = check_partition(spec, p)
    if block_rows <= 0:
        raise LayoutError(f"block_rows must be > 0, got {block_rows}")
    rng = np.random.default_rng((spec.seed, p))
    valid, dtype = spec.valid_rows(p), numpy_dtype(spec.dtype)
    for start in range(0, spec.rows_per_partition, block_rows):
        stop = min(start + block_rows, spec.rows_per_partition)
        block = np.zeros((stop - start, spec.dim), dtype=np.float32)
        n = max(0, min(stop, valid) - start)  # rows >= valid are padding and stay 0
        rng.standard_normal(dtype=np.float32, out=block[:n])  # block[:n] is contiguous
        block[:n] *= np.float32(spec.init_std)
        yield start, block.astype(dtype, copy=False)
