"""Arrays <-> `ultramem.v1.Tensor` messages (DESIGN §4.2, STYLE §14).

The one module that turns numpy arrays into raw little-endian bytes with dtype and shape and back.
Decoding validates everything a peer could get wrong (unknown dtype, dtype not allowed here,
wrong rank, negative dims, byte length != prod(shape) * itemsize) and raises
`InvalidRequestError` with a message naming the field, before anything else sees the array.
Decoded arrays are zero-copy `np.frombuffer` views (read-only) of the message bytes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from param_server.errors import InvalidRequestError
from protos.ultramem.v1 import memory_pb2 as pb
from storage.layout import bfloat16

WireDType = Literal["float32", "bfloat16", "float16", "int64", "int32"]

# wire dtype name -> enum value
_ENUMS: dict[str, int] = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16,
                          "int64": pb.INT64, "int32": pb.INT32}
# wire dtype name -> numpy dtype in the byte order that travels (little-endian); bfloat16 (2 bytes,
# byte order handled where it is read) is ml_dtypes', looked up on first use (`layout.bfloat16`)
_NUMPY: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
                               "int64": np.dtype("<i8"), "int32": np.dtype("<i4")}
_BY_ENUM: dict[int, str] = {enum: name for name, enum in _ENUMS.items()}


def _spec(name: str) -> tuple[int, np.dtype]:
    """(enum value, numpy dtype) of a known wire dtype name."""
    return _ENUMS[name], (bfloat16() if name == "bfloat16" else _NUMPY[name])
VALUE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # allowed for values and grads
_LITTLE = sys.byteorder == "little"


def dtype_enum(name: str) -> int:
    """Wire dtype name ("float32", "bfloat16", ...) -> `pb.DType` value; InvalidRequestError if unknown."""
    try:
        return _ENUMS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown wire dtype {name!r}; expected one of {sorted(_ENUMS)}") from None


def dtype_name(enum: int, *, default: str | None = None) -> str:
    """`pb.DType` value -> name; DTYPE_UNSPECIFIED -> `default` (or an error when None)."""
    if enum == pb.DTYPE_UNSPECIFIED and default is not None:
        return default
    try:
        return _BY_ENUM[enum]
    except KeyError:
        raise InvalidRequestError(f"unknown wire dtype enum {enum}") from None


def numpy_dtype(name: str) -> np.dtype:
    """Numpy dtype of a wire dtype name (native byte order for bfloat16)."""
    dtype_enum(name)
    return _spec(name)[1]


def encode(array: np.ndarray, dtype: str | None = None, out: pb.Tensor | None = None) -> pb.Tensor:
    """Any array -> Tensor in wire dtype `dtype` (default: the array's own, if it is a wire dtype).

    Float conversion (e.g. float32 -> bfloat16) rounds to nearest even. Fills `out` if given.
    """
    array = np.asarray(array)
    if dtype is None:
        dtype = array.dtype.name
    enum, np_dtype = _spec(dtype) if dtype in _ENUMS else (dtype_enum(dtype), None)
    assert np_dtype is not None
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(array.astype(np_dtype, copy=False)).view(np.uint16)
        data = bits.tobytes() if _LITTLE else bits.astype("<u2").tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=np_dtype).tobytes()
    msg = out if out is not None else pb.Tensor()
    msg.dtype = enum
    msg.shape[:] = array.shape
    msg.data = data
    return msg


def decode(
    tensor: pb.Tensor,
    field: str,
    *,
    allowed: Iterable[str],
    ndim: int | None = None,
    trailing: Sequence[int | None] = (),
) -> np.ndarray:
    """Tensor -> read-only numpy view, validated.

    Args:
        tensor: the message field.
        field: its name, for error messages ("rows", "grads").
        allowed: wire dtype names accepted here.
        ndim: required rank, if any.
        trailing: required sizes of the last dims (None = any), e.g. (d_v,) for [U, d_v].
    Raises:
        InvalidRequestError: unknown or disallowed dtype, wrong rank or trailing dims, negative
            dims, or a byte length that is not prod(shape) * itemsize.
    """
    return _view(tensor.dtype, tuple(tensor.shape), tensor.data, field, allowed, ndim, trailing)


def _view(enum: int, shape_in: Sequence[int], data: bytes | memoryview, field: str, allowed: Iterable[str],
          ndim: int | None, trailing: Sequence[int | None]) -> np.ndarray:
    """The checks of `decode` on raw parts, then a zero-copy view."""
    allowed = tuple(allowed)
    if enum not in _BY_ENUM:
        raise InvalidRequestError(f"{field}: unknown dtype enum {enum}; expected one of {allowed}")
    name = _BY_ENUM[enum]
    if name not in allowed:
        raise InvalidRequestError(f"{field}: dtype {name} not allowed here; expected one of {allowed}")
    shape = tuple(int(s) for s in shape_in)
    if ndim is not None and len(shape) != ndim:
        raise InvalidRequestError(f"{field}: expected {ndim} dims, got shape {list(shape)}")
    if any(s < 0 for s in shape):
        raise InvalidRequestError(f"{field}: negative dimension in shape {list(shape)}")
    for want, got in zip(reversed(tuple(trailing)), reversed(shape)):
        if want is not None and want != got:
            raise InvalidRequestError(f"{field}: expected trailing dims {list(trailing)}, got shape {list(shape)}")
    np_dtype = _spec(name)[1]
    expected = math.prod(shape) * np_dtype.itemsize  # Python ints: np.prod would wrap at 2**63
    if len(data) != expected:
        raise InvalidRequestError(
            f"{field}: {len(data)} bytes do not match shape {list(shape)} of {name} ({expected} bytes)"
        )
    if name == "bfloat16" and not _LITTLE:
        return np.frombuffer(data, dtype="<u2").astype("=u2").view(np_dtype).reshape(shape)
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


# -- the hot path without message objects ---------------------------------------------------------
# A Gather answer is ~1 MB of values wrapped in a few bytes of protobuf framing. Building it through
# pb.Tensor costs three extra copies (tobytes, the message field, SerializeToString) and parsing it
# two (FromString, the .data accessor). These helpers write and read the same protobuf wire format
# (byte-identical to SerializeToString; tests prove it) with one join on the way out and a
# zero-copy np.frombuffer view on the way in. Any protobuf peer still reads and writes them.

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64 travel as 10-byte two's complement
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidRequestError("malformed protobuf: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def tensor_field_bytes(field_number: int, array: np.ndarray, dtype: str) -> list[bytes | memoryview]:
    """Parts that, joined, are a message field `field_number` holding `encode(array, dtype)`."""
    enum, np_dtype = _spec(dtype)
    if dtype == "bfloat16":
        wire_array = np.ascontiguousarray(array.astype(np_dtype, copy=False)).view(np.uint16)
        if not _LITTLE:
            wire_array = wire_array.astype("<u2")
    else:
        wire_array = np.ascontiguousarray(array, dtype=np_dtype)
    head = bytearray(b"\x08" + _varint(enum))
    if array.ndim:
        dims = b"".join(_varint(int(d)) for d in array.shape)
        head += b"\x12" + _varint(len(dims)) + dims
    nbytes = wire_array.nbytes
    if nbytes:
        head += b"\x1a" + _varint(nbytes)
    key = _varint((field_number << 3) | 2)
    body: memoryview = memoryview(wire_array).cast("B") if nbytes else memoryview(b"")
    return [key + _varint(len(head) + nbytes) + bytes(head), body]


def tensor_message_bytes(field_number: int, array: np.ndarray, dtype: str) -> bytes:
    """Serialized message whose only field `field_number` is a Tensor (e.g. a GatherResponse)."""
    return b"".join(tensor_field_bytes(field_number, array, dtype))


def varint_field_bytes(field_number: int, value: int) -> bytes:
    """A serialized int64 field (appended to a fast-path message, e.g. GatherResponse.applied_step)."""
    return _varint(field_number << 3) + _varint(value)


def parse_int_field(message: bytes, field_number: int) -> int | None:
    """Read int64 field `field_number` of a serialized message (the last one wins); None if absent."""
    buf = memoryview(message)
    pos, found = 0, None
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = _read_varint(buf, pos)
            if number == field_number:
                found = value - (1 << 64) if value >= 1 << 63 else value
        elif kind == 2:
            length, pos = _read_varint(buf, pos)
            pos += length
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise InvalidRequestError(f"malformed protobuf: wire type {kind}")
    return found


def parse_tensor_field(
    message: bytes, field_number: int, name: str, *, allowed: Iterable[str], ndim: int | None = None,
    trailing: Sequence[int | None] = (),
) -> np.ndarray:
    """Read Tensor field `field_number` of a serialized message as a validated zero-copy view.

    Unknown fields are skipped; a missing field reads as an empty Tensor (and fails validation).
    """
    buf = memoryview(message)
    pos, found = 0, memoryview(b"")
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, pos = _read_varint(buf, pos)
        elif kind == 2:
            length, pos = _read_varint(buf, pos)
            if number == field_number:
                found = buf[pos:pos + length]
            pos += length
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise InvalidRequestError(f"malformed protobuf: wire type {kind}")
    if pos != len(buf):
        raise InvalidRequestError("malformed protobuf: truncated field")
    enum, shape, data = 0, [], memoryview(b"")
    pos = 0
    while pos < len(found):
        key, pos = _read_varint(found, pos)
        number, kind = key >> 3, key & 7
        if number == 1 and kind == 0:
            enum, pos = _read_varint(found, pos)
        elif number == 2 and kind == 2:  # packed shape
            length, pos = _read_varint(found, pos)
            end = pos + length
            while pos < end:
                dim, pos = _read_varint(found, pos)
                shape.append(_signed(dim))
        elif number == 2 and kind == 0:  # unpacked shape (allowed by the protobuf spec)
            dim, pos = _read_varint(found, pos)
            shape.append(_signed(dim))
        elif kind == 2:
            length, pos = _read_varint(found, pos)
            if number == 3:
                data = found[pos:pos + length]
            pos += length
        elif kind == 0:
            _, pos = _read_varint(found, pos)
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise InvalidRequestError(f"malformed protobuf: wire type {kind}")
    if pos != len(found):
        raise InvalidRequestError("malformed protobuf: truncated tensor")
    return _view(enum, shape, data, name, allowed, ndim, trailing)


def decode_values(tensor: pb.Tensor, field: str, ndim: int = 2, trailing: Sequence[int | None] = ()) -> np.ndarray:
    """A float tensor in any value dtype -> float32 array (a view when it already is float32)."""
    array = decode(tensor, field, allowed=VALUE_DTYPES, ndim=ndim, trailing=trailing)
    return array if array.dtype == np.float32 else array.astype(np.float32)


def decode_ids(tensor: pb.Tensor, field: str) -> np.ndarray:
    """An INT64 (or INT32) 1-D id tensor -> int64 array [n]."""
    array = decode(tensor, field, allowed=("int64", "int32"), ndim=1)
    return array if array.dtype == np.int64 else array.astype(np.int64)
