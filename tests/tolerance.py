"""How closely two float results must agree, by where they were computed.

On the CPU, ONNX Runtime and torch give a row the same value in any batch, to float32 rounding.
A GPU picks kernels by batch shape and may use TF32 tensor cores, so the same row can differ
by about 1e-4 relative; a mixed-up row still differs by orders of magnitude more.
"""

from __future__ import annotations

import torch

from shared.onnx_session import cuda_usable

CPU = {"rtol": 1e-5, "atol": 1e-6}
GPU = {"rtol": 1e-3, "atol": 1e-4}


def served() -> dict[str, float]:
    """The tolerance for results of the cluster's services, which run on a GPU when one works."""
    return GPU if cuda_usable() or torch.cuda.is_available() else CPU
