"""Per-model inference statistics kept by the gateway, for Triton's ModelStatistics."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class ModelCounters:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    last_inference_ms: int = 0


class ModelStats:
    def __init__(self) -> None:
        self.by_model: dict[str, ModelCounters] = {}

    def _counters(self, model: str) -> ModelCounters:
        counters = self.by_model.get(model)
        if counters is None:  # setdefault would build a ModelCounters on every call
            counters = self.by_model[model] = ModelCounters()
        return counters

    def succeeded(self, model: str, ns: int, cache_outcome: str) -> None:
        counters = self._counters(model)
        counters.success_count += 1
        counters.success_ns += ns
        counters.last_inference_ms = int(time.time() * 1000)
        if cache_outcome == "hit":
            counters.cache_hits += 1
        elif cache_outcome == "miss":
            counters.cache_misses += 1

    def failed(self, model: str, ns: int) -> None:
        counters = self._counters(model)
        counters.fail_count += 1
        counters.fail_ns += ns
