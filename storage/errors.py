"""Typed errors of the storage package (STYLE habit 10; docs/internals.md "storage/").

One hierarchy under `StorageError`; each subclass also inherits the builtin it behaves like, so
callers that only know builtins (`except FileNotFoundError`) still catch the right thing.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised on purpose by `storage/`."""


class TableNotFoundError(StorageError, FileNotFoundError):
    """No ultramem table group exists at the given path."""


class TableExistsError(StorageError, FileExistsError):
    """A table (or other data) already exists where a new table was to be created."""


class ReadOnlyTableError(StorageError, PermissionError):
    """A write was attempted on a table opened with mode "r"."""


class LayoutError(StorageError, ValueError):
    """An array, spec or index does not match the table layout (shape, dtype, range, attributes)."""


class CheckpointError(StorageError, ValueError):
    """A checkpoint directory or manifest is missing, corrupt or inconsistent."""
