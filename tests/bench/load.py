"""A closed-loop gRPC load generator: C concurrent callers, each sending its next call when the last returns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class LoadResult:
    calls: int
    errors: int
    seconds: float
    latencies_s: list[float]

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")


async def closed_loop(
    call: Callable[[], object], concurrency: int, duration_s: float, warmup_s: float = 0.5
) -> LoadResult:
    """Runs `call` (an awaitable factory) from `concurrency` callers; measures after a warm-up."""
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + warmup_s + duration_s

    async def caller() -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                await call()
            except Exception:  # noqa: BLE001 - counted, the load goes on
                errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - start)

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    measuring = True
    begin = time.monotonic()
    await asyncio.gather(*tasks)
    return LoadResult(len(latencies), errors, time.monotonic() - begin, latencies)
