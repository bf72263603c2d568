"""Create, open, read and write memory tables in Zarr v3 (DESIGN §5; layout in storage/layout.py).

A `TableStore` is the durable home of a table: the parameter server keeps resident partitions in
RAM and uses this module to load and save whole partitions or row subsets. Every write touches
one partition only, and chunks never straddle partitions, so each Zarr chunk has one writer: the
shard that owns the partition. zarr-python spends ~1 ms of Python per chunk (DESIGN §8), so reads
and writes use one slice per array where they can.

All writes validate every input first (typed `LayoutError` / `ReadOnlyTableError`) and only then
touch the store, so a rejected write changes nothing.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import LocalStore

from storage.errors import LayoutError, ReadOnlyTableError, TableExistsError, TableNotFoundError
from storage.layout import (
    DEFAULT_TARGET_CHUNK_BYTES,
    VALUES,
    ArrayLayout,
    TableSpec,
    array_attributes,
    check_partition,
    from_storage,
    is_table_attributes,
    partition_value_blocks,
    spec_from_attributes,
    table_arrays,
    table_attributes,
    to_storage,
)

logger = logging.getLogger(__name__)

_INIT_BLOCK_BYTES = 64 << 20  # initial values are generated and written ~64 MiB at a time


def create_table(
    path: str | Path,
    spec: TableSpec,
    *,
    initialize: bool | Iterable[int] = True,
    overwrite: bool = False,
    target_chunk_bytes: int = DEFAULT_TARGET_CHUNK_BYTES,
    compress_state: bool = True,
) -> TableStore:
    """Create a table group at path: arrays, attributes and (optionally) initial values.

    Args:
        path: directory of the new Zarr v3 group.
        spec: the table spec, stored in the group attributes.
        initialize: True writes every partition's initial values (one block at a time, never the
            whole table in memory); an iterable of partition ids writes only those, so several
            processes can each initialise their own partitions later with
            `open_table(path, "r+").initialize_partitions(ps)`; False writes none (checkpoint
            targets). Optimizer state needs no writes: it starts at the fill value 0.
        overwrite: replace an existing table at path (never anything that is not a table).
        target_chunk_bytes: about how many bytes one chunk holds (chunk rows are capped at R).
        compress_state: optimizer state in zstd (default, for checkpoints and resident tables);
            False makes every array plain little-endian `bytes`, which the chunk cache's raw engine
            reads and rewrites in place (work tables served beyond RAM; storage/chunk_io.py).

    Returns: a writable TableStore.
    Raises: TableExistsError if path holds data (or, with overwrite, data that is not a table);
        LayoutError for a bad spec, partition id or chunk target.
    """
    path = Path(path)
    if not isinstance(spec, TableSpec):
        raise LayoutError(f"spec must be a TableSpec, got {type(spec).__name__}")
    if initialize is True:
        partitions: list[int] = list(range(spec.num_partitions))
    elif initialize is False:
        partitions = []
    else:
        partitions = [check_partition(spec, p) for p in initialize]
    if not isinstance(compress_state, bool):
        raise LayoutError(f"compress_state must be a bool, got {compress_state!r}")
    layouts = table_arrays(spec, compress_state=compress_state)
    chunks = {name: a.chunks(spec, target_chunk_bytes) for name, a in layouts.items()}  # validates target
    _clear_for_create(path, overwrite)

    group = zarr.open_group(LocalStore(path), mode="w-", zarr_format=3, attributes=table_attributes(spec))
    arrays = {}
    for name, a in layouts.items():
        arrays[name] = group.create_array(
            name,
            shape=a.shape(spec),
            dtype=a.storage_dtype,
            chunks=chunks[name],
            fill_value=0,
            compressors=[ZstdCodec(level=1)] if a.compressed else None,
            dimension_names=a.dimension_names(),
            attributes=array_attributes(spec, a),
        )
    logger.info(
        "created table %s at %s: %s partitions x %s rows, chunks %s, state %s",
        spec.name,
        path,
        spec.num_partitions,
        spec.rows_per_partition,
        chunks,
        "zstd" if compress_state else "raw",
    )
    store = TableStore(path, spec, arrays, read_only=False)
    store.initialize_partitions(partitions)
    return store


def _clear_for_create(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    if not overwrite:
        raise TableExistsError(f"{path} already exists; pass overwrite=True to replace a table")
    if not _is_table_dir(path):
        raise TableExistsError(f"{path} holds data that is not an ultramem table; refusing to overwrite it")
    shutil.rmtree(path)


def _is_table_dir(path: Path) -> bool:
    try:
        group = zarr.open_group(LocalStore(path, read_only=True), mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    return is_table_attributes(group.attrs.asdict())


def open_table(path: str | Path, mode: Literal["r", "r+"] = "r") -> TableStore:
    """Open an existing table group ("r" read-only, "r+" read-write).

    Raises: TableNotFoundError if path holds no ultramem table; LayoutError if its metadata does
        not match the layout (missing array, wrong shape, dtype or chunking, bad spec).
    """
    path = Path(path)
    if mode not in ("r", "r+"):
        raise LayoutError(f"mode must be 'r' or 'r+', got {mode!r}")
    if not (path / "zarr.json").is_file():
        raise TableNotFoundError(f"no table at {path} (no zarr.json)")
    try:
        group = zarr.open_group(LocalStore(path, read_only=mode == "r"), mode=mode, zarr_format=3)
        attrs = group.attrs.asdict()
    except FileNotFoundError as err:
        raise TableNotFoundError(f"no table at {path}: {err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise LayoutError(f"unreadable table metadata at {path}: {err}") from err
    if not is_table_attributes(attrs):
        raise TableNotFoundError(f"{path} is a Zarr group but not an ultramem table")
    spec = spec_from_attributes(attrs)
    arrays = {name: _open_array(group, spec, a, path) for name, a in table_arrays(spec).items()}
    return TableStore(path, spec, arrays, read_only=mode == "r")


def _open_array(group: zarr.Group, spec: TableSpec, a: ArrayLayout, path: Path) -> zarr.Array:
    try:
        arr = group[a.name]
    except KeyError as err:
        raise LayoutError(f"table {spec.name} at {path}: array {a.name!r} is missing") from err
    if not isinstance(arr, zarr.Array):
        raise LayoutError(f"table {spec.name} at {path}: {a.name!r} is not an array")
    if arr.shape != a.shape(spec) or arr.dtype != a.storage_dtype:
        raise LayoutError(
            f"table {spec.name} at {path}: array {a.name!r} is {arr.shape} {arr.dtype}, "
            f"expected {a.shape(spec)} {a.storage_dtype}"
        )
    chunks = arr.chunks
    if arr.shards is not None or chunks[0] != 1 or chunks[2:] != a.trailing:
        raise LayoutError(
            f"table {spec.name} at {path}: array {a.name!r} chunks {chunks} (shards {arr.shards}) "
            f"straddle partitions or rows; expected (1, rows, *{a.trailing}) without sharding"
        )
    return arr


class TableStore:
    """A table on disk. Speaks numpy in the spec's dtypes; one partition per call."""

    def __init__(self, path: Path, spec: TableSpec, arrays: dict[str, zarr.Array], *, read_only: bool):
        """Use `create_table` or `open_table`; arrays must match `table_arrays(spec)`."""
        self.path = path
        self.spec = spec
        self.read_only = read_only
        self._layouts = table_arrays(spec)
        assert list(arrays) == list(self._layouts), (list(arrays), list(self._layouts))
        self._arrays = arrays

    def __repr__(self) -> str:
        mode = "r" if self.read_only else "r+"
        return f"TableStore({str(self.path)!r}, {self.spec.name!r}, mode={mode!r})"

    @property
    def array_names(self) -> tuple[str, ...]:
        """Names of the arrays: "values" first, then the optimizer state."""
        return tuple(self._layouts)

    def chunk_shape(self, name: str) -> tuple[int, ...]:
        """Chunk shape (1, chunk_rows, *trailing) of one array."""
        return tuple(self._arrays[self._check_name(name)].chunks)

    def array_metadata(self, name: str) -> ArrayV3Metadata:
        """The Zarr v3 metadata of one array as stored (codecs, chunk key encoding, fill value)."""
        metadata = self._arrays[self._check_name(name)].metadata
        assert isinstance(metadata, ArrayV3Metadata), "tables are Zarr v3 (create_table, _open_array)"
        return metadata

    def array_path(self, name: str) -> Path:
        """Directory of one array (its zarr.json and chunk keys live under it)."""
        return self.path / self._check_name(name)

    def nbytes(self) -> dict[str, int]:
        """Uncompressed bytes per array, padding rows included: NP * R * prod(trailing) * itemsize."""
        return {
            name: int(np.prod(a.shape(self.spec))) * a.storage_dtype.itemsize
            for name, a in self._layouts.items()
        }

    # --- whole partitions ------------------------------------------------------------------

    def read_partition(self, p: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Partition p: {"values": [R, d_v], state: [R, ...]}, padding rows included.

        names limits which arrays are read (default: all). One slice (chunk_rows-sized reads) per array.
        """
        p = check_partition(self.spec, p)
        return {
            name: from_storage(self._arrays[name][p], self._layouts[name].dtype)
            for name in self._names(names)
        }

    def write_partition(self, p: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Overwrite partition p of each given array: values [R, d_v], state [R, ...], exact dtypes.

        Any subset of the table's arrays may be given. Raises LayoutError (nothing written) for an
        unknown name, a wrong shape or dtype; ReadOnlyTableError on a read-only table.
        """
        p = check_partition(self.spec, p)
        checked = self._check_write(arrays, (self.spec.rows_per_partition,))
        for name, data in checked:
            self._arrays[name][p] = to_storage(data)

    def initialize_partitions(self, partitions: Iterable[int]) -> None:
        """Write the initial values of the given partitions (layout.init_partition_values).

        Independent of which process runs it or in which order; state arrays are not touched
        (they are 0 on a fresh table). Generated and written in blocks of whole chunks.
        """
        partitions = [check_partition(self.spec, p) for p in partitions]
        self._check_writable()
        values = self._arrays[VALUES]
        chunk_rows = values.chunks[1]
        row_bytes = self.spec.dim * self._layouts[VALUES].storage_dtype.itemsize
        block_rows = chunk_rows * max(1, _INIT_BLOCK_BYTES // (chunk_rows * row_bytes))
        for p in partitions:
            for start, block in partition_value_blocks(self.spec, p, block_rows):
                values[p, start : start + len(block)] = to_storage(block)
        logger.debug("initialised %d partitions of table %s", len(partitions), self.spec.name)

    # --- row subsets -----------------------------------------------------------------------

    def read_rows(
        self, p: int, local_rows: np.ndarray, names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows of partition p: local_rows int [N] (may repeat, any order) -> {name: [N, ...]}.

        Raises LayoutError unless every local row is in [0, valid_rows(p)).
        """
        p = check_partition(self.spec, p)
        rows = self._check_rows(p, local_rows)
        names = self._names(names)
        unique, inverse = np.unique(rows, return_inverse=True)
        in_order = len(unique) == len(rows) and bool(np.array_equal(unique, rows))
        out = {}
        for name in names:
            data = from_storage(self._read_sorted(name, p, unique), self._layouts[name].dtype)
            out[name] = data if in_order else data[inverse]
        return out

    def write_rows(self, p: int, local_rows: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """Overwrite rows of partition p: local_rows int [N] unique, arrays {name: [N, ...]}.

        Raises LayoutError (nothing written) for duplicate or out-of-range rows, an unknown name,
        a wrong shape or dtype; ReadOnlyTableError on a read-only table.
        """
        p = check_partition(self.spec, p)
        rows = self._check_rows(p, local_rows)
        if len(np.unique(rows)) != len(rows):
            raise LayoutError(f"table {self.spec.name}: write_rows got duplicate local rows")
        checked = self._check_write(arrays, (len(rows),))
        if len(rows) == 0:
            return
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        for name, data in checked:
            data = to_storage(data[order])
            if contiguous:
                self._arrays[name][p, int(rows[0]) : int(rows[-1]) + 1] = data
            else:
                self._arrays[name].oindex[p, rows] = data

    # --- helpers ---------------------------------------------------------------------------

    def _read_sorted(self, name: str, p: int, rows: np.ndarray) -> np.ndarray:
        arr = self._arrays[name]
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # one slice when the rows are a run
            return arr[p, int(rows[0]) : int(rows[-1]) + 1]
        if len(rows) == 0:
            return np.empty((0, *self._layouts[name].trailing), dtype=self._layouts[name].storage_dtype)
        return arr.oindex[p, rows]

    def _check_name(self, name: str) -> str:
        if name not in self._layouts:
            raise LayoutError(f"table {self.spec.name}: unknown array {name!r}; arrays: {self.array_names}")
        return name

    def _names(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self._layouts)
        if isinstance(names, str):
            raise LayoutError(f"names must be a sequence of array names, got the string {names!r}")
        return [self._check_name(n) for n in names]

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyTableError(f"table {self.spec.name} at {self.path} is open read-only")

    def _check_rows(self, p: int, local_rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(local_rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise LayoutError(f"local_rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        valid = self.spec.valid_rows(p)
        if rows.size and (rows.min() < 0 or rows.max() >= valid):
            raise LayoutError(f"table {self.spec.name}: local rows of partition {p} must be in [0, {valid})")
        return rows

    def _check_write(
        self, arrays: Mapping[str, np.ndarray], leading: tuple[int, ...]
    ) -> list[tuple[str, np.ndarray]]:
        self._check_writable()
        if not isinstance(arrays, Mapping) or not arrays:
            raise LayoutError(f"table {self.spec.name}: expected a non-empty dict of arrays")
        checked = []
        for name, data in arrays.items():
            a = self._layouts[self._check_name(name)]
            expected = (*leading, *a.trailing)
            if not isinstance(data, np.ndarray) or data.dtype != a.dtype or data.shape != expected:
                got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise LayoutError(
                    f"table {self.spec.name}: array {name!r} must be {a.dtype} {expected}, got {got}"
                )
            checked.append((name, data))
        return checked
