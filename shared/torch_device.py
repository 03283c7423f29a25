"""Chooses the torch device for a service's settings and applies its GPU memory cap."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_torch_device(device: str, device_index: int = 0, gpu_memory_limit_mb: int = 0) -> torch.device:
    """'auto' takes the GPU when CUDA works; 'cuda' without CUDA falls back to the CPU with a warning.

    The memory cap becomes torch's per-process memory fraction of that GPU.
    """
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if device != "auto":
            log.warning("device %s requested but CUDA is not available; running on cpu", device)
        return torch.device("cpu")
    chosen = torch.device("cuda", device_index)
    if gpu_memory_limit_mb:
        total_mb = torch.cuda.get_device_properties(chosen).total_memory / (1024 * 1024)
        fraction = min(1.0, gpu_memory_limit_mb / total_mb)
        torch.cuda.set_per_process_memory_fraction(fraction, chosen)
        log.info(
            "torch on %s capped at %d MiB (%.1f%% of %d MiB)", chosen, gpu_memory_limit_mb, fraction * 100, total_mb
        )
    from shared.observability import GPU_MEMORY

    GPU_MEMORY.labels(str(chosen)).set_function(lambda: torch.cuda.memory_allocated(chosen))
    return chosen
