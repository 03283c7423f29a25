"""Chooses the torch device for a service's `device` setting, falling back to the CPU."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_torch_device(setting: str) -> torch.device:
    """'auto' takes cuda:0 when CUDA works, 'cuda:N' falls back to the CPU with a warning."""
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda:0" if setting == "auto" else setting)
    if setting != "auto":
        log.warning("device %s requested but CUDA is not available; running on cpu", setting)
    return torch.device("cpu")
