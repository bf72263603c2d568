"""Errors of the parameter server, and the one table that maps them to gRPC status codes.

Every error a `Shard` raises is a `ShardError`; each subclass also inherits the builtin it
resembles (STYLE §3.10), so plain Python callers can catch `ValueError`, `KeyError`, ... .
`STATUS_CODE_NAMES` is the single mapping from error type to a `grpc.StatusCode` *name* (a plain
string such as "INVALID_ARGUMENT"), so this module and `param_server.shard` never import grpc; the
servicer turns the name into `grpc.StatusCode[name]`, the client maps it back with `error_for_code`.
"""

from __future__ import annotations

import queue


class ShardError(Exception):
    """Base of every error raised by param_server/."""


class ConfigError(ShardError, ValueError):
    """A shard or optimizer configuration field is unknown or out of range; the message names it."""


class InvalidRequestError(ShardError, ValueError):
    """A request is malformed: bad dtype, shape, length, row range, projector, non-finite numbers."""


class UnknownTableError(ShardError, KeyError):
    """The request names a table this shard does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "unknown table"


class PathNotFoundError(ShardError, FileNotFoundError):
    """A directory or table group the request or the shard needs does not exist (where it looked)."""


class WrongShardError(ShardError, LookupError):
    """A row lives in a partition this shard does not own (the client's partition map is stale)."""


class StaleEpochError(ShardError, RuntimeError):
    """The request was routed with an old partition-map epoch; `epoch` is the current one."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


class QueueFullError(ShardError, queue.Full):
    """The apply queue holds `max_pending` pushes; nothing was queued, retry later (backpressure)."""


class RequestTooLargeError(ShardError, ValueError):
    """A request carries more rows than `ShardConfig.max_rows_per_request`; split it."""


class PermissionDeniedError(ShardError, PermissionError):
    """The caller may not do this on this shard."""


class ReadOnlyError(PermissionDeniedError):
    """A write (push, pooled backward) reached a read-only (serving) shard."""


class UnauthenticatedError(ShardError, PermissionError):
    """The request carried no valid shared-secret token (DESIGN §7)."""


class WaitTimeoutError(ShardError, TimeoutError):
    """A lookup's `min_step` (or a drain) was not reached within the allowed time."""


class ShardClosedError(ShardError, RuntimeError):
    """The shard was closed; it accepts no more pushes."""


# The one table: error type -> grpc.StatusCode name. Looked up along the MRO, so the most specific
# entry wins (ReadOnlyError finds its own row before PermissionDeniedError's).
STATUS_CODE_NAMES: dict[type[ShardError], str] = {
    ShardError: "INTERNAL",
    ConfigError: "INVALID_ARGUMENT",
    InvalidRequestError: "INVALID_ARGUMENT",
    UnknownTableError: "NOT_FOUND",
    PathNotFoundError: "NOT_FOUND",
    WrongShardError: "FAILED_PRECONDITION",
    StaleEpochError: "FAILED_PRECONDITION",
    QueueFullError: "RESOURCE_EXHAUSTED",
    RequestTooLargeError: "RESOURCE_EXHAUSTED",
    PermissionDeniedError: "PERMISSION_DENIED",
    ReadOnlyError: "PERMISSION_DENIED",
    UnauthenticatedError: "UNAUTHENTICATED",
    WaitTimeoutError: "DEADLINE_EXCEEDED",
    ShardClosedError: "UNAVAILABLE",
}

# The reverse direction for the client: one canonical type per code. Codes shared by several
# types (FAILED_PRECONDITION, RESOURCE_EXHAUSTED, PERMISSION_DENIED) map to the type a client reacts
# to: refresh the map, back off, give up.
_CANONICAL_FOR_CODE: dict[str, type[ShardError]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "NOT_FOUND": UnknownTableError,
    "FAILED_PRECONDITION": WrongShardError,
    "RESOURCE_EXHAUSTED": QueueFullError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "DEADLINE_EXCEEDED": WaitTimeoutError,
    "UNAVAILABLE": ShardClosedError,
}


def status_code_name(err: BaseException) -> str:
    """The grpc.StatusCode name for `err` ("INTERNAL" for anything that is not a ShardError)."""
    for cls in type(err).__mro__:
        name = STATUS_CODE_NAMES.get(cls)  # type: ignore[call-overload]
        if name is not None:
            return name
    return "INTERNAL"


def error_for_code(code_name: str, message: str, *, epoch: int | None = None) -> ShardError:
    """Rebuild a typed error from a status code name and message (client side).

    A FAILED_PRECONDITION that carries `epoch` becomes a StaleEpochError with that epoch.
    """
    if code_name == "FAILED_PRECONDITION" and epoch is not None:
        return StaleEpochError(message, epoch)
    return _CANONICAL_FOR_CODE.get(code_name, ShardError)(message)
