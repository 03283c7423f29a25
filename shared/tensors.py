"""Converters between `maas.common.v1.Tensor` and numpy arrays, with input validation.

Tensors travel as dtype + shape + raw little-endian bytes; decoding is a zero-copy view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from maas.common.v1 import tensor_pb2
from shared.errors import InvalidArgumentError

DataType = tensor_pb2.DataType

NUMPY_DTYPES: dict[int, np.dtype] = {
    DataType.DATA_TYPE_FP32: np.dtype("<f4"),
    DataType.DATA_TYPE_FP64: np.dtype("<f8"),
    DataType.DATA_TYPE_FP16: np.dtype("<f2"),
    DataType.DATA_TYPE_INT8: np.dtype("i1"),
    DataType.DATA_TYPE_INT32: np.dtype("<i4"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
# Keyed by (kind, itemsize) so that native, little- and big-endian arrays all map.
_CODES_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in NUMPY_DTYPES.items()}

# Names used in manifests and messages: "FP32", "INT64", ...
DTYPE_NAMES: dict[int, str] = {code: DataType.Name(code).removeprefix("DATA_TYPE_") for code in NUMPY_DTYPES}
DTYPE_CODES: dict[str, int] = {name: code for code, name in DTYPE_NAMES.items()}


MAX_DIMS = 8
# Larger than any real tensor's side; keeps every product of dimensions within a machine word.
MAX_DIM = 2**31 - 1


def check_shape(shape: Sequence[int], field: str, max_elements: int | None = None) -> int:
    """The element count of `shape`, refusing negative or absurd dimensions and too many elements,
    with no per-element work and no overflow (Python integers)."""
    if len(shape) > MAX_DIMS:
        raise InvalidArgumentError(f"{field}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    for dim in shape:
        if dim < 0 or dim > MAX_DIM:
            raise InvalidArgumentError(
                f"{field}: shape {list(shape)[:MAX_DIMS]} has dimension {dim}; each must be 0..{MAX_DIM}"
            )
    elements = math.prod(shape)
    if max_elements is not None and elements > max_elements:
        raise InvalidArgumentError(f"{field}: shape {list(shape)} holds {elements} elements; at most {max_elements}")
    return elements


def dtype_name(code: int) -> str:
    return DTYPE_NAMES.get(code, DataType.Name(code) if code in DataType.values() else str(code))


def to_numpy(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    """Decodes a Tensor, checking its dtype and that the bytes match the shape.

    `field` names the tensor in error messages, e.g. "inputs['input']".
    """
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgumentError(
            f"{field}: unsupported dtype {dtype_name(tensor.dtype)}; expected one of {', '.join(DTYPE_NAMES.values())}"
        )
    shape = tuple(tensor.shape)
    expected = check_shape(shape, field) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgumentError(
            f"{field}: shape {list(shape)} of {dtype_name(tensor.dtype)} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def from_numpy(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encodes an array as a Tensor (little-endian, row-major)."""
    array = np.asarray(array)
    code = _CODES_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise InvalidArgumentError(f"cannot encode numpy dtype {array.dtype} as a maas Tensor")
    data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code]).tobytes()
    return tensor_pb2.Tensor(dtype=code, shape=list(array.shape), data=data)


def decode_inputs(inputs: Mapping[str, tensor_pb2.Tensor], field: str = "inputs") -> dict[str, np.ndarray]:
    return {name: to_numpy(tensor, f"{field}['{name}']") for name, tensor in inputs.items()}


def encode_outputs(outputs: Mapping[str, np.ndarray], wanted: Sequence[str] = ()) -> dict[str, tensor_pb2.Tensor]:
    """Encodes the wanted outputs (all when `wanted` is empty)."""
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise InvalidArgumentError(f"output_names: unknown output {unknown[0]!r}; the model has {sorted(outputs)}")
    names = wanted or list(outputs)
    return {name: from_numpy(outputs[name]) for name in names}
