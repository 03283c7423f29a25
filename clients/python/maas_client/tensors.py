"""numpy arrays to and from `maas.common.v1.Tensor`: dtype, shape and raw little-endian bytes.

The SDK's own codec, so that callers need only the generated stubs, grpcio and numpy, not the
cluster's `shared` library (whose codec raises the server's errors).
"""

from __future__ import annotations

import math

import numpy as np

from maas.common.v1 import tensor_pb2

DataType = tensor_pb2.DataType

_DTYPES: dict[int, np.dtype] = {
    DataType.DATA_TYPE_FP32: np.dtype("<f4"),
    DataType.DATA_TYPE_FP64: np.dtype("<f8"),
    DataType.DATA_TYPE_FP16: np.dtype("<f2"),
    DataType.DATA_TYPE_INT8: np.dtype("i1"),
    DataType.DATA_TYPE_INT32: np.dtype("<i4"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
# By (kind, itemsize), so native, little- and big-endian arrays all encode.
_CODES = {(dtype.kind, dtype.itemsize): code for code, dtype in _DTYPES.items()}


def encode(array: np.ndarray | list) -> tensor_pb2.Tensor:
    """Encodes an array (or nested list) as a Tensor. Python floats become FP32, ints INT64."""
    given_array = isinstance(array, np.ndarray | np.generic)
    array = np.asarray(array)
    if not given_array and array.dtype == np.float64:
        array = array.astype(np.float32)
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        supported = ", ".join(str(dtype) for dtype in _DTYPES.values())
        raise TypeError(f"cannot send numpy dtype {array.dtype} to maas; use one of {supported}")
    data = np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    return tensor_pb2.Tensor(dtype=code, shape=list(array.shape), data=data)


def decode(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decodes a Tensor into a read-only numpy view of its bytes."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"maas sent a tensor of unsupported dtype {DataType.Name(tensor.dtype)}")
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"maas sent a tensor of shape {list(tensor.shape)} with {len(tensor.data)} bytes, not {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
