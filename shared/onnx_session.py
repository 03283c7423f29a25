"""ONNX Runtime sessions: configurable providers (CUDA first, TensorRT optional, CPU last),
per-service GPU index and memory cap, and the provider each session really got."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from shared.batching import concat_rows, split_rows
from shared.model_store import TensorSignature
from shared.tensors import DTYPE_CODES, NUMPY_DTYPES

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OnnxConfig:
    device: str = "auto"  # auto, cpu or cuda
    device_index: int = 0
    gpu_memory_limit_mb: int = 0
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    graph_optimization: str = "all"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    extra_provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> OnnxConfig:
        return cls(
            device=settings.device,
            device_index=settings.device_index,
            gpu_memory_limit_mb=settings.gpu_memory_limit_mb,
            providers=tuple(settings.onnx_providers),
            graph_optimization=settings.onnx_graph_optimization,
            intra_op_threads=settings.onnx_intra_op_threads,
            inter_op_threads=settings.onnx_inter_op_threads,
        )


@functools.cache
def gpu_provider_usable(provider: str = "CUDAExecutionProvider") -> bool:
    """Whether a GPU provider really loads here (onnxruntime-gpu lists it even without a GPU).

    Probed once on a one-node graph, with ORT's own error log silenced, so that a CPU-only
    machine logs one clear fallback line instead of a provider-library stack.
    """
    if provider not in ort.get_available_providers():
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
        session = ort.InferenceSession(probe.SerializeToString(), providers=[provider, "CPUExecutionProvider"])
        return session.get_providers()[0] == provider
    except Exception:  # noqa: BLE001 - any failure means the provider is not usable
        return False
    finally:
        ort.set_default_logger_severity(2)


def cuda_usable() -> bool:
    return gpu_provider_usable("CUDAExecutionProvider")


def execution_providers(config: OnnxConfig) -> list[str | tuple[str, dict]]:
    """The configured providers that can run here, with their options; the CPU always comes last."""
    providers: list[str | tuple[str, dict]] = []
    if config.device != "cpu":
        for name in config.providers:
            if name not in GPU_PROVIDERS:
                continue
            if not gpu_provider_usable(name):
                if config.device == "cuda":
                    log.warning("%s requested but not usable here; falling back", name)
                continue
            options: dict[str, Any] = {"device_id": config.device_index}
            if config.gpu_memory_limit_mb and name == "CUDAExecutionProvider":
                options["gpu_mem_limit"] = config.gpu_memory_limit_mb * 1024 * 1024
                options["arena_extend_strategy"] = "kSameAsRequested"
            options.update(config.extra_provider_options.get(name, {}))
            providers.append((name, options))
    providers.append("CPUExecutionProvider")
    return providers


class OnnxSession:
    """One InferenceSession; `device` names the provider that really runs it."""

    def __init__(self, path: Path, config: OnnxConfig | None = None) -> None:
        config = config or OnnxConfig()
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.graph_optimization_level = OPTIMIZATION_LEVELS[config.graph_optimization]
        self.session = ort.InferenceSession(str(path), options, providers=execution_providers(config))
        self.device = self.session.get_providers()[0]
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))


class OnnxModel:
    """A model version whose whole graph is one ONNX file with batch-first inputs and outputs."""

    def __init__(self, path: Path, signature_inputs: list[TensorSignature], config: OnnxConfig | None = None) -> None:
        self.session = OnnxSession(path, config)
        self.device = self.session.device
        self.signature_inputs = signature_inputs

    def warm_up(self) -> None:
        """One batch of zeros, so the first real request does not pay for lazy initialisation."""
        feeds = {
            spec.name: np.zeros(
                [1 if dim < 0 else dim for dim in spec.shape], dtype=NUMPY_DTYPES[DTYPE_CODES[spec.dtype]]
            )
            for spec in self.signature_inputs
        }
        self.session.run(feeds)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(inputs)

    def item_size(self, inputs: dict[str, np.ndarray]) -> int:
        return len(next(iter(inputs.values())))

    def run_batch(self, items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Concatenates the items along the batch axis, runs once, and splits the rows back."""
        batch, sizes = concat_rows(items)
        return split_rows(self.session.run(batch), sizes)
