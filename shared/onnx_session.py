"""ONNX Runtime sessions: configurable providers (CUDA first, TensorRT optional, CPU last),
per-service GPU index and memory cap, and the provider each session really got."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from shared.batching import concat_rows, split_rows
from shared.errors import DeviceUnavailableError
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
    pad_batches: bool = True  # on a GPU only: pad batches to a few sizes, warmed up at load

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
            extra_provider_options={"CUDAExecutionProvider": dict(settings.onnx_cuda_options)},
            pad_batches=settings.gpu_pad_batches,
        )


# The probe graph's IR version. onnx's make_model writes its own newest IR (14 for onnx 1.23),
# which an older ONNX Runtime refuses (1.31 reads at most 13); IR 8 is read by every
# ONNX Runtime since 1.10, so the probe tests the provider and not the file format.
PROBE_IR_VERSION = 8
PROBE_OPSET = 17


@dataclass(frozen=True)
class ProviderCheck:
    """Whether a provider really runs a graph here, and if not, why."""

    provider: str
    usable: bool
    reason: str = ""


def probe_model() -> bytes:
    """A one-node graph (Identity on one float) that any ONNX Runtime can load."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", PROBE_OPSET)], ir_version=PROBE_IR_VERSION
    )
    return model.SerializeToString()


@functools.cache
def load_gpu_libraries() -> str:
    """Loads the CUDA and cuDNN libraries of the nvidia-* wheels (requirements-gpu.lock), if installed.

    onnxruntime-gpu finds them only through LD_LIBRARY_PATH or `preload_dlls()`; a CUDA base
    image has them on the system path already. Returns what happened, for the log.
    """
    wheels = [Path(p) / "nvidia" for p in sys.path if (Path(p) / "nvidia").is_dir()]
    if not wheels or not hasattr(ort, "preload_dlls"):
        return "no nvidia-* library wheels installed; using the system's CUDA libraries, if any"
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # preload_dlls prints its failures
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - a failed preload leaves the system paths
            print(f"preload_dlls failed: {exc}")
    return said.getvalue().strip() or f"loaded the CUDA libraries from {wheels[0]}"


def _provider_library_error(provider: str) -> str | None:
    """Why the provider's shared library cannot load (a missing CUDA library, say), or None."""
    library = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}.get(provider)
    capi = Path(ort.__file__).parent / "capi"
    if library is None or not (capi / f"libonnxruntime_providers_{library}.so").exists():
        return None
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / f"libonnxruntime_providers_{library}.so"))
    except OSError as exc:
        return str(exc)
    return None


@functools.cache
def check_provider(provider: str = "CUDAExecutionProvider") -> ProviderCheck:
    """Whether `provider` runs the probe graph here (onnxruntime-gpu lists CUDA even without a GPU).

    Probed once per process, with ORT's own error log silenced, so that a CPU-only machine logs
    one clear line instead of a provider-library stack.
    """
    if provider == "CPUExecutionProvider":
        return ProviderCheck(provider, True)
    if provider not in ort.get_available_providers():
        return ProviderCheck(provider, False, f"this onnxruntime build ({ort.__version__}) has no {provider}")
    if provider in GPU_PROVIDERS:
        load_gpu_libraries()
    if (error := _provider_library_error(provider)) is not None:
        return ProviderCheck(provider, False, f"its library does not load: {error}")
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(probe_model(), providers=[provider, "CPUExecutionProvider"])
        ran = session.run(None, {"x": np.ones(1, np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - any failure means the provider is not usable
        return ProviderCheck(provider, False, f"a probe session failed: {exc}")
    finally:
        ort.set_default_logger_severity(2)
    if session.get_providers()[0] != provider:
        return ProviderCheck(provider, False, "ONNX Runtime fell back to the CPU: no usable GPU or driver (nvidia-smi)")
    if ran.tolist() != [1.0]:
        return ProviderCheck(provider, False, f"the probe graph gave {ran.tolist()}, not [1.0]")
    return ProviderCheck(provider, True)


def gpu_provider_usable(provider: str = "CUDAExecutionProvider") -> bool:
    return check_provider(provider).usable


def cuda_usable() -> bool:
    return gpu_provider_usable("CUDAExecutionProvider")


# Serving defaults for the CUDA provider; MAAS_<SERVICE>_ONNX_CUDA_OPTIONS overrides any of them.
CUDA_SERVING_OPTIONS: dict[str, Any] = {
    # EXHAUSTIVE (ORT's default) benchmarks every convolution algorithm on each new input shape,
    # so each new batch size a batcher forms would pay seconds on a live request.
    "cudnn_conv_algo_search": "HEURISTIC",
}


def execution_providers(config: OnnxConfig) -> list[str | tuple[str, dict]]:
    """The configured providers that can run here, with their options; the CPU always comes last.

    `device="cuda"` that cannot be honoured raises DeviceUnavailableError naming the cause;
    `auto` falls back to the CPU and logs why, once per process.
    """
    providers: list[str | tuple[str, dict]] = []
    if config.device != "cpu":
        for name in config.providers:
            if name not in GPU_PROVIDERS:
                continue
            check = check_provider(name)
            if not check.usable:
                _log_fallback_once(check)
                continue
            options: dict[str, Any] = {"device_id": config.device_index}
            if name == "CUDAExecutionProvider":
                options.update(CUDA_SERVING_OPTIONS)
                if config.gpu_memory_limit_mb:
                    options["gpu_mem_limit"] = config.gpu_memory_limit_mb * 1024 * 1024
                    options["arena_extend_strategy"] = "kSameAsRequested"
            options.update(config.extra_provider_options.get(name, {}))
            providers.append((name, options))
        if config.device == "cuda" and not providers:
            reasons = "; ".join(f"{c.provider}: {c.reason}" for c in map(check_provider, _gpu_names(config)))
            raise DeviceUnavailableError(
                f"device=cuda was requested, but no GPU provider can run here ({reasons or 'none is configured'}). "
                "Install the GPU libraries (make venv GPU=1, or a CUDA 13 + cuDNN 9 image), or set device=auto or cpu"
            )
    providers.append("CPUExecutionProvider")
    return providers


def _gpu_names(config: OnnxConfig) -> list[str]:
    return [name for name in config.providers if name in GPU_PROVIDERS]


@functools.cache
def _log_fallback_once(check: ProviderCheck) -> None:
    log.warning("%s is not usable, so ONNX models run on the CPU: %s", check.provider, check.reason)


def check_device(config: OnnxConfig) -> str:
    """Resolves the configured device at start: the provider that will run models, or DeviceUnavailableError."""
    first = execution_providers(config)[0]
    return first if isinstance(first, str) else first[0]


class OnnxSession:
    """One InferenceSession; `device` names the provider that really runs it."""

    def __init__(self, path: Path | bytes, config: OnnxConfig | None = None) -> None:
        config = config or OnnxConfig()
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.graph_optimization_level = OPTIMIZATION_LEVELS[config.graph_optimization]
        # From bytes, not a path: an ONNX graph naming external-data files cannot make ONNX Runtime
        # open anything beside the one file the manifest lists.
        model = path if isinstance(path, bytes) else Path(path).read_bytes()
        self.session = ort.InferenceSession(model, options, providers=execution_providers(config))
        self.device = self.session.get_providers()[0]
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a GPU model pads to: powers of two up to max_batch_size, and max_batch_size."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max(1, max_batch_size)]


class OnnxModel:
    """A model version whose whole graph is one ONNX file with batch-first inputs and outputs.

    On a GPU, batches are padded with zero rows to a few fixed sizes, each warmed up at load:
    a new input shape makes the CUDA provider choose kernels (and cuDNN algorithms) again, which
    a dynamic batcher would otherwise pay on live requests for every batch size it forms.
    Rows are independent in these models, so the padding never changes a real row's output.
    """

    def __init__(
        self, path: Path | bytes, signature_inputs: list[TensorSignature], config: OnnxConfig | None = None
    ) -> None:
        config = config or OnnxConfig()
        self.session = OnnxSession(path, config)
        self.device = self.session.device
        self.signature_inputs = signature_inputs
        self.pad_batches = config.pad_batches and self.device in GPU_PROVIDERS
        self.buckets: list[int] = []

    def _zeros(self, rows: int) -> dict[str, np.ndarray]:
        return {
            spec.name: np.zeros(
                [rows, *(1 if dim < 0 else dim for dim in spec.shape[1:])], dtype=NUMPY_DTYPES[DTYPE_CODES[spec.dtype]]
            )
            for spec in self.signature_inputs
        }

    def warm_up(self, max_batch_size: int = 1) -> None:
        """Runs zeros at every batch size it will run, so no live request pays for a first run."""
        self.buckets = batch_buckets(max_batch_size) if self.pad_batches else []
        for rows in self.buckets or [1]:
            self.session.run(self._zeros(rows))

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run_batch([inputs])[0]

    def item_size(self, inputs: dict[str, np.ndarray]) -> int:
        return len(next(iter(inputs.values())))

    def run_batch(self, items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Concatenates the items along the batch axis, runs once, and splits the rows back."""
        batch, sizes = concat_rows(items)
        rows = sum(sizes)
        padded = next((b for b in self.buckets if b >= rows), rows)
        if padded > rows:
            batch = {
                name: np.concatenate([value, np.zeros((padded - rows, *value.shape[1:]), value.dtype)])
                for name, value in batch.items()
            }
        outputs = self.session.run(batch)
        if padded > rows:
            outputs = {name: value[:rows] for name, value in outputs.items()}
        return split_rows(outputs, sizes)
