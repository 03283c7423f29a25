"""Chooses the torch device for a service's settings and applies its GPU memory cap."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from shared.errors import DeviceUnavailableError

log = logging.getLogger(__name__)


def resolve_torch_device(device: str, device_index: int = 0, gpu_memory_limit_mb: int = 0) -> torch.device:
    """'auto' takes the GPU when CUDA works, else the CPU (saying why); 'cuda' without a usable GPU
    raises DeviceUnavailableError, so the process stops at start with the reason.

    The memory cap becomes torch's per-process memory fraction of that GPU.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device not in ("auto", "cuda"):
        raise DeviceUnavailableError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    reason = _cuda_unusable_reason(device_index)
    if reason is not None:
        if device == "cuda":
            raise DeviceUnavailableError(f"device=cuda was requested, but torch cannot use it: {reason}")
        log.warning("torch models run on the CPU: %s", reason)
        return torch.device("cpu")
    chosen = torch.device("cuda", device_index)
    if gpu_memory_limit_mb:
        total_mb = torch.cuda.get_device_properties(chosen).total_memory / (1024 * 1024)
        fraction = min(1.0, gpu_memory_limit_mb / total_mb)
        torch.cuda.set_per_process_memory_fraction(fraction, chosen)
        log.info(
            "torch on %s capped at %d MiB (%.1f%% of %d MiB)", chosen, gpu_memory_limit_mb, fraction * 100, total_mb
        )
    _export_gpu_memory(chosen)
    return chosen


def _export_gpu_memory(device: torch.device) -> None:
    from shared.observability import GPU_MEMORY

    gauge = GPU_MEMORY.labels(str(device))
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        gauge.set_function(lambda: torch.cuda.memory_allocated(device))
        return

    # Multiprocess metrics are files that a scrape reads, not callbacks: refresh the value.
    def refresh() -> None:
        while True:
            gauge.set(torch.cuda.memory_allocated(device))
            time.sleep(5)

    threading.Thread(target=refresh, name="gpu-memory-gauge", daemon=True).start()


def _cuda_unusable_reason(device_index: int) -> str | None:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "CUDA is not available: no GPU or no driver (nvidia-smi)"
    if device_index >= torch.cuda.device_count():
        return f"device_index={device_index}, but only {torch.cuda.device_count()} GPU(s) are visible"
    return None
