"""Checks request tensors against a model's signature before they reach the model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.errors import InvalidArgumentError
from shared.model_store import TensorSignature
from shared.tensors import DTYPE_CODES, NUMPY_DTYPES


def check_inputs(signature: list[TensorSignature], inputs: Mapping[str, np.ndarray]) -> int:
    """Validates names, dtypes and shapes; returns the batch size shared by all inputs."""
    expected = {spec.name for spec in signature}
    for name in inputs:
        if name not in expected:
            raise InvalidArgumentError(f"inputs: unknown input {name!r}; the model takes {sorted(expected)}")
    batch = None
    for spec in signature:
        array = inputs.get(spec.name)
        field = f"inputs['{spec.name}']"
        if array is None:
            raise InvalidArgumentError(f"inputs: missing {spec.name!r}; the model takes {sorted(expected)}")
        want_dtype = NUMPY_DTYPES[DTYPE_CODES[spec.dtype]]
        if array.dtype != want_dtype:
            got = next(name for name, code in DTYPE_CODES.items() if NUMPY_DTYPES[code] == array.dtype)
            raise InvalidArgumentError(f"{field}: dtype must be {spec.dtype}, got {got}")
        if array.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        ):
            raise InvalidArgumentError(f"{field}: shape must be {spec.shape} (-1 is any size), got {list(array.shape)}")
        if array.shape[0] == 0:
            raise InvalidArgumentError(f"{field}: the batch is empty")
        if batch is not None and array.shape[0] != batch:
            raise InvalidArgumentError(f"{field}: batch size {array.shape[0]} differs from the other inputs' {batch}")
        batch = array.shape[0]
    return batch or 0
