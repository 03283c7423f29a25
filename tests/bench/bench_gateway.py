"""Gateway overhead: the same dense calls sent straight to the dense service and through the gateway.

Uncached calls all differ (nothing to coalesce or cache); the cache-hit figure repeats one call.

Run with `make bench`. Figures are ratios against the direct (one-hop) baseline measured in the
same run, since absolute times on a shared machine mean little.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.defaults import ensure_defaults
from shared.cluster import ClusterPorts, LocalCluster
from shared.model_store import ModelStore
from shared.tensors import from_numpy
from tests.bench.load import closed_loop

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = [int(c) for c in os.environ.get("MAAS_BENCH_CONCURRENCY", "1,16,64").split(",")]


def distinct_requests(count: int = 4096) -> list[dense_pb2.PredictRequest]:
    """Calls that differ, so the gateway can neither coalesce nor cache them: pure forwarding."""
    rows = np.random.default_rng(0).integers(0, 17, size=(count, 1, 64)).astype(np.float32)
    return [dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(row)}) for row in rows]


async def measure(target: str, concurrency: int, requests, metadata=()) -> object:
    cycle = itertools.cycle(requests)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = dense_pb2_grpc.DenseServiceStub(channel)
        return await closed_loop(
            lambda: stub.Predict(next(cycle), timeout=10, metadata=metadata), concurrency, DURATION_S
        )


async def main() -> None:
    store = ModelStore(Path("var/models"))
    ensure_defaults(store)
    with tempfile.TemporaryDirectory() as var:
        cluster = LocalCluster(ClusterPorts.free(), store.root, Path(var), log_dir=Path(var) / "logs")
        cluster.start()
        try:
            direct_target = cluster.specs["dense"].target
            gateway_target = cluster.specs["gateway"].target
            print(f"\ngateway overhead, digits-mlp, 1 row per call, {DURATION_S:.0f}s per cell, {os.cpu_count()} cores")
            print(
                f"{'conc':>4} | {'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} | "
                f"{'gateway rps':>11} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} | {'cache-hit rps':>13} {'ratio':>6}"
            )
            distinct = distinct_requests()
            repeated = distinct[:1]
            for concurrency in CONCURRENCY:
                direct = await measure(direct_target, concurrency, distinct)
                via = await measure(gateway_target, concurrency, distinct, (("cache-control", "no-store"),))
                hits = await measure(gateway_target, concurrency, repeated)
                print(
                    f"{concurrency:>4} | {direct.throughput:>10.0f} {direct.percentile_ms(50):>7.2f} "
                    f"{direct.percentile_ms(99):>7.2f} | {via.throughput:>11.0f} {via.percentile_ms(50):>7.2f} "
                    f"{via.percentile_ms(99):>7.2f} {via.throughput / direct.throughput:>6.2f} | "
                    f"{hits.throughput:>13.0f} {hits.throughput / direct.throughput:>6.2f}",
                    flush=True,
                )
                if direct.errors or via.errors or hits.errors:
                    print(f"     errors: direct {direct.errors}, gateway {via.errors}, cache-hit {hits.errors}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
