"""ONNX Runtime sessions that ask for CUDA first and fall back to the CPU, and say which they got."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)


@functools.cache
def cuda_usable() -> bool:
    """Whether the CUDA provider really loads here (onnxruntime-gpu lists it even without a GPU).

    Probed once on a one-node graph, with ORT's own error log silenced, so that a CPU-only
    machine logs one clear fallback line instead of a provider-library stack.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        return session.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:  # noqa: BLE001 - any failure means no CUDA
        return False
    finally:
        ort.set_default_logger_severity(2)


def execution_providers(device: str) -> list[str | tuple[str, dict]]:
    """Provider list for a device setting: 'auto', 'cpu' or 'cuda:N'."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    device_id = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    providers: list[str | tuple[str, dict]] = []
    if cuda_usable():
        providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    elif device.startswith("cuda"):
        log.warning("device %s requested but CUDA is not usable here; running on the CPU", device)
    providers.append("CPUExecutionProvider")
    return providers


class OnnxSession:
    """One InferenceSession; `device` names the provider that really runs it."""

    def __init__(self, path: Path, device: str = "auto", intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        requested = execution_providers(device)
        self.session = ort.InferenceSession(str(path), options, providers=requested)
        self.device = self.session.get_providers()[0]
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))


class OnnxModel:
    """A model version whose whole graph is one ONNX file, fed by name as its signature says."""

    def __init__(self, path: Path, signature_inputs: list, device: str = "auto", threads: int = 1) -> None:
        self.session = OnnxSession(path, device, threads)
        self.device = self.session.device
        self.signature_inputs = signature_inputs

    def warm_up(self) -> None:
        """One batch of zeros, so the first real request does not pay for lazy initialisation."""
        from shared.tensors import DTYPE_CODES, NUMPY_DTYPES

        feeds = {
            spec.name: np.zeros(
                [1 if dim < 0 else dim for dim in spec.shape], dtype=NUMPY_DTYPES[DTYPE_CODES[spec.dtype]]
            )
            for spec in self.signature_inputs
        }
        self.session.run(feeds)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(inputs)
