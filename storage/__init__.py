"""ultramem storage: memory tables as Zarr v3 groups, and checkpoints (DESIGN §5).

Imports nothing else of ours and speaks numpy. `layout` knows the on-disk layout, `table_store`
reads and writes tables, `checkpoint` lays out checkpoint directories and writes atomically.
"""

from storage.checkpoint import (
    MANIFEST,
    TABLES,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    latest_checkpoint,
    list_checkpoints,
    list_files,
    read_manifest,
    step_dir,
    step_of,
    table_path,
    verify_checkpoint,
    write_manifest,
)
from storage.errors import (
    CheckpointError,
    LayoutError,
    ReadOnlyTableError,
    StorageError,
    TableExistsError,
    TableNotFoundError,
)
from storage.layout import (
    DEFAULT_TARGET_CHUNK_BYTES,
    LAYOUT_VERSION,
    OPTIMIZER_STATE,
    VALUES,
    TableSpec,
    global_row_of,
    init_partition_values,
    local_row_of,
    numpy_dtype,
    partition_of,
    state_layout,
)
from storage.table_store import TableStore, create_table, open_table

__all__ = [
    "DEFAULT_TARGET_CHUNK_BYTES",
    "LAYOUT_VERSION",
    "MANIFEST",
    "OPTIMIZER_STATE",
    "TABLES",
    "VALUES",
    "CheckpointError",
    "LayoutError",
    "ReadOnlyTableError",
    "StorageError",
    "TableExistsError",
    "TableNotFoundError",
    "TableSpec",
    "TableStore",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "create_table",
    "global_row_of",
    "init_partition_values",
    "latest_checkpoint",
    "list_checkpoints",
    "list_files",
    "local_row_of",
    "numpy_dtype",
    "open_table",
    "partition_of",
    "read_manifest",
    "state_layout",
    "step_dir",
    "step_of",
    "table_path",
    "verify_checkpoint",
    "write_manifest",
]
