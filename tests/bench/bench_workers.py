"""A model service with one worker against the same service with two (B1).

Run with `make bench`. wide-mlp (compute-heavy, so the model and not the gRPC front decides)
with 1-row calls at concurrency 64, on two dense services side by side: MAAS_DENSE_WORKERS=1
and =2 (processes sharing one port, each with its own ONNX Runtime session and batcher). The
clients switch between them every slice. B1 asks for 2 workers at 1.6x the rows/s of 1 or more.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.bench.bench_batching import FAMILIES, build_wide_mlp, requests_for, start_service, stop
from tests.bench.load import CallSpec, run_interleaved
from tests.stores import plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = int(os.environ.get("MAAS_BENCH_WORKERS_CONCURRENCY", "64"))


def main() -> None:
    dense = FAMILIES["dense"]
    with tempfile.TemporaryDirectory() as tmp:
        store = plain_defaults(Path(tmp) / "models")
        build_wide_mlp(store)
        requests = requests_for("wide-mlp")
        services = [
            start_service(dense, store.root, batching=True, extra_env={"MAAS_DENSE_WORKERS": str(workers)})
            for workers in (1, 2)
        ]
        try:
            one, two = run_interleaved(
                [CallSpec(target, dense.method, requests) for _, target in services], CONCURRENCY, DURATION_S
            )
        finally:
            for process, _ in services:
                stop(process)
    print(f"\ndense service workers, wide-mlp, 1 row per call, concurrency {CONCURRENCY}, {os.cpu_count()} cores")
    print(f"{'workers':>7} | {'rows/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for workers, result in ((1, one), (2, two)):
        p50, p99 = result.percentile_ms(50), result.percentile_ms(99)
        print(f"{workers:>7} | {result.throughput:>7.0f} {p50:>7.2f} {p99:>7.2f}")
    print(f"2 workers / 1 worker: {two.throughput / one.throughput:.2f}x rows/s")


if __name__ == "__main__":
    main()
