"""param_server/wire.py: arrays <-> Tensor messages round-trip and reject malformed tensors (DESIGN §4.2)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from param_server import wire
from param_server.errors import InvalidRequestError
from protos.ultramem.v1 import memory_pb2 as pb

_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.float32, np.float16, np.int64, np.int32]), shape=_shapes))
def test_roundtrip_is_bit_exact_for_native_wire_dtypes(array: np.ndarray) -> None:
    msg = pb.Tensor.FromString(wire.encode(array).SerializeToString())
    name = array.dtype.name
    back = wire.decode(msg, "x", allowed=(name,))
    assert back.shape == array.shape and back.dtype == array.dtype
    assert back.tobytes() == array.tobytes()


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (5, 8), elements=st.floats(-1e6, 1e6, width=32)))
def test_float32_to_bfloat16_rounds_like_ml_dtypes(array: np.ndarray) -> None:
    back = wire.decode(wire.encode(array, "bfloat16"), "v", allowed=("bfloat16",))
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.view(np.uint16), array.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_allclose(wire.decode_values(wire.encode(array, "bfloat16"), "v"), array, rtol=2**-8, atol=1e-37)


def test_bytes_are_little_endian_regardless_of_input_byte_order() -> None:
    big = np.array([1.0, 2.0], dtype=">f4")
    assert wire.encode(big).data == np.array([1.0, 2.0], dtype="<f4").tobytes()
    assert wire.encode(np.array([1], dtype=">i8")).data == b"\x01" + b"\x00" * 7


def test_decode_is_a_zero_copy_view_of_the_message_bytes() -> None:
    msg = wire.encode(np.arange(6, dtype=np.float32).reshape(2, 3))
    view = wire.decode(msg, "v", allowed=("float32",))
    assert not view.flags.writeable and not view.flags.owndata


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda m: setattr(m, "data", m.data[:-1]), "bytes do not match"),
        (lambda m: m.shape.__setitem__(0, 3), "bytes do not match"),
        (lambda m: setattr(m, "dtype", pb.INT64), "not allowed"),
        (lambda m: setattr(m, "dtype", 99), "unknown dtype"),
        (lambda m: m.shape.append(1), "expected 2 dims"),
        (lambda m: m.shape.__setitem__(0, -2), "negative"),
    ],
)
def test_malformed_tensor_is_rejected_with_the_field_name(mutate, needle: str) -> None:
    msg = wire.encode(np.zeros((2, 4), np.float32))
    mutate(msg)
    with pytest.raises(InvalidRequestError, match=needle) as info:
        wire.decode(msg, "grads", allowed=wire.VALUE_DTYPES, ndim=2)
    assert "grads" in str(info.value)


def test_wrong_trailing_dim_is_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="trailing"):
        wire.decode(wire.encode(np.zeros((2, 4), np.float32)), "grads", allowed=("float32",), trailing=(8,))


def test_ids_accept_int32_and_widen_to_int64() -> None:
    ids = wire.decode_ids(wire.encode(np.array([3, 1], np.int32)), "rows")
    assert ids.dtype == np.int64 and ids.tolist() == [3, 1]


def test_unknown_dtype_names_are_rejected() -> None:
    with pytest.raises(InvalidRequestError):
        wire.dtype_enum("float64")
    assert wire.dtype_name(pb.DTYPE_UNSPECIFIED, default="float32") == "float32"


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.float32, np.float16, np.int64]), shape=_shapes),
       st.sampled_from([1, 2, 7]))
def test_fast_path_bytes_equal_protobuf_serialization(array: np.ndarray, field: int) -> None:
    name = array.dtype.name
    fast = wire.tensor_message_bytes(field, array, name)
    if field == 1:
        assert fast == pb.GatherResponse(values=wire.encode(array, name)).SerializeToString()
    back = wire.parse_tensor_field(fast, field, "v", allowed=(name,))
    assert back.shape == array.shape and back.tobytes() == array.tobytes()


def test_fast_path_bfloat16_matches_and_parser_skips_unknown_fields() -> None:
    array = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    msg = pb.PooledGatherResponse(tokens=wire.encode(np.array([5, -1])), sums=wire.encode(array, "bfloat16"))
    raw = msg.SerializeToString()
    assert wire.tensor_message_bytes(1, array, "bfloat16") == \
        pb.GatherResponse(values=wire.encode(array, "bfloat16")).SerializeToString()
    sums = wire.parse_tensor_field(raw, 2, "sums", allowed=("bfloat16",), ndim=2, trailing=(4,))
    np.testing.assert_array_equal(sums, array.astype(ml_dtypes.bfloat16))
    assert wire.parse_tensor_field(raw, 1, "tokens", allowed=("int64",)).tolist() == [5, -1]


def test_fast_path_parser_rejects_truncated_messages() -> None:
    raw = wire.tensor_message_bytes(1, np.ones((4, 4), np.float32), "float32")
    with pytest.raises(InvalidRequestError):
        wire.parse_tensor_field(raw[:-5], 1, "values", allowed=("float32",))
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        wire.parse_tensor_field(b"", 1, "values", allowed=("float32",))


@given(st.integers(-(2**63), 2**63 - 1))
def test_an_int64_field_appended_to_a_fast_path_message_reads_back(value):
    msg = wire.tensor_message_bytes(1, np.zeros((2, 3), np.float32), "float32") + wire.varint_field_bytes(2, value)
    assert wire.parse_int_field(msg, 2) == value
    assert pb.GatherResponse.FromString(msg).applied_step == value  # protobuf agrees
    assert wire.parse_int_field(wire.tensor_message_bytes(1, np.zeros(1, np.float32), "float32"), 2) is None


@settings(max_examples=30, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**40), max_size=6, unique=True), e=st.integers(1, 3),
       dtype=st.sampled_from(["float32", "bfloat16"]), applied=st.integers(-1, 2**40))
def test_a_pooled_answer_built_from_parts_reads_as_the_protobuf_message(tokens, e, dtype, applied):
    """The servicer's PooledGather fast path: the parts joined are a PooledGatherResponse."""
    tok = np.array(sorted(tokens), np.int64)
    sums = np.arange(tok.size * e * 4, dtype=np.float32).reshape(tok.size, e, 4) / 7
    raw = b"".join([*wire.tensor_field_bytes(1, tok, "int64"), *wire.tensor_field_bytes(2, sums, dtype),
                    wire.varint_field_bytes(3, applied)])
    msg = pb.PooledGatherResponse.FromString(raw)
    assert msg == pb.PooledGatherResponse(tokens=wire.encode(tok, "int64"), sums=wire.encode(sums, dtype),
                                          applied_step=applied)
