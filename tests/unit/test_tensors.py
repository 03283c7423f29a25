import numpy as np
import pytest

from maas.common.v1 import tensor_pb2
from shared.errors import InvalidArgumentError
from shared.tensors import decode_inputs, encode_outputs, from_numpy, to_numpy


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.arange(4, dtype=np.float64),
        np.arange(4, dtype=np.float16),
        np.array([-3, 4], dtype=np.int8),
        np.array([1, 2], dtype=np.int32),
        np.array([1 << 40], dtype=np.int64),
        np.array([255], dtype=np.uint8),
        np.array([True, False]),
        np.zeros((0, 64), dtype=np.float32),
    ],
)
def test_round_trip_keeps_dtype_shape_and_values(array):
    back = to_numpy(from_numpy(array), "x")
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_big_endian_arrays_are_sent_little_endian():
    array = np.arange(3, dtype=">i4")
    tensor = from_numpy(array)
    assert tensor.data == np.arange(3, dtype="<i4").tobytes()
    np.testing.assert_array_equal(to_numpy(tensor, "x"), array)


def test_bytes_that_do_not_match_the_shape_name_the_field_and_the_sizes():
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FP32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidArgumentError) as err:
        to_numpy(tensor, "inputs['pixels']")
    assert "inputs['pixels']" in err.value.message
    assert "needs 24 bytes, got 20" in err.value.message


def test_unspecified_dtype_is_refused_with_the_choices():
    tensor = tensor_pb2.Tensor(shape=[1], data=b"\0" * 4)
    with pytest.raises(InvalidArgumentError, match="unsupported dtype .*expected one of FP32"):
        to_numpy(tensor, "x")


def test_negative_dimension_is_refused():
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2], data=b"")
    with pytest.raises(InvalidArgumentError, match=r"has dimension -1; each must be 0..2147483647"):
        to_numpy(tensor, "x")


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([0, 2**62], "has dimension 4611686018427387904"),  # no bytes, and no overflow: refused all the same
        ([1] * 9, "9 dimensions; at most 8"),
        ([2**31 - 1, 2**31 - 1], "needs"),  # within each dimension's bound; the bytes do not match
    ],
)
def test_absurd_shapes_are_invalid_not_internal(shape, fragment):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FP32, shape=shape, data=b"")
    with pytest.raises(InvalidArgumentError, match=fragment):
        to_numpy(tensor, "x")


def test_decode_and_encode_by_name():
    inputs = decode_inputs({"a": from_numpy(np.ones((1, 2), np.float32))})
    assert inputs["a"].shape == (1, 2)
    outputs = {"p": np.zeros(2, np.float32), "label": np.zeros(2, np.int64)}
    assert set(encode_outputs(outputs)) == {"p", "label"}
    assert set(encode_outputs(outputs, ["label"])) == {"label"}
    with pytest.raises(InvalidArgumentError, match="unknown output 'nope'"):
        encode_outputs(outputs, ["nope"])
