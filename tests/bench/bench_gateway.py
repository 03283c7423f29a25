"""The gateway against a one-hop call to the dense service, cache hits, and the CPU each call costs.

Run with `make bench`. The cluster runs as `make run` starts it (the gateway with one worker
per core). In each row the clients switch between the three kinds of call every slice, so
drift on a shared machine hits them alike: read the ratios.

- direct: digits-mlp calls straight to the dense service (the one-hop baseline);
- gateway: the same calls through the gateway, all distinct and `no-store`, so nothing is
  coalesced or cached: pure forwarding;
- cache hit: one call repeated through the gateway, answered from each worker's memory.

B2 asks, at concurrency 64, for hits at 2x or more of uncached calls and 1.0x or more of direct
ones. B3 is the gateway's CPU time per forwarded call (all workers, user + system) beside a bare
grpc.aio echo server's, in the same run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

from maas.dense.v1 import dense_pb2
from shared.cluster import ClusterPorts, LocalCluster, free_port
from shared.tensors import from_numpy
from tests.bench.load import CallSpec, run_interleaved, run_load
from tests.stores import plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = [int(c) for c in os.environ.get("MAAS_BENCH_CONCURRENCY", "1,16,64").split(",")]
PREDICT = "/maas.dense.v1.DenseService/Predict"
NO_STORE = (("cache-control", "no-store"),)


def distinct_requests(count: int = 4096) -> tuple[bytes, ...]:
    """Calls that differ, so the gateway can neither coalesce nor cache them: pure forwarding."""
    rows = np.random.default_rng(0).integers(0, 17, size=(count, 1, 64)).astype(np.float32)
    return tuple(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(row)}).SerializeToString()
        for row in rows
    )


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def cpu_per_call(processes: list[psutil.Process], spec: CallSpec, concurrency: int) -> tuple[float, float]:
    """(CPU seconds per answered call in `processes`, calls/s) for one run of load."""
    before = cpu_seconds(processes)
    result = run_load(spec, concurrency, DURATION_S, warmup_s=0.0)
    spent = cpu_seconds(processes) - before
    # Calls that started before or ended after the window used CPU too; count every answered one.
    calls = result.calls + result.errors
    return spent / max(1, calls), result.throughput


def start_echo() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.bench.echo_server", str(port)])
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return process, target


def main() -> None:
    distinct = distinct_requests()
    with tempfile.TemporaryDirectory() as var:
        store = plain_defaults(Path(var) / "models")
        cluster = LocalCluster(ClusterPorts.free(), store.root, Path(var), log_dir=Path(var) / "logs")
        cluster.start()
        echo, echo_target = start_echo()
        try:
            gateway_spec = cluster.specs["gateway"]
            direct = CallSpec(cluster.specs["dense"].target, PREDICT, distinct)
            forwarded = CallSpec(gateway_spec.target, PREDICT, distinct, NO_STORE)
            hits = CallSpec(gateway_spec.target, PREDICT, distinct[:1])
            print(
                f"\ngateway, digits-mlp, 1 row per call, {gateway_spec.workers} gateway workers, "
                f"{DURATION_S:.0f}s per cell, {os.cpu_count()} cores"
            )
            print(
                f"{'conc':>4} | {'direct rps':>10} {'p50 ms':>7} | {'gateway rps':>11} {'p50 ms':>7} {'/direct':>7} | "
                f"{'cache-hit rps':>13} {'p50 ms':>7} {'/direct':>7} {'/gateway':>8}"
            )
            for concurrency in CONCURRENCY:
                one_hop, via, hit = run_interleaved([direct, forwarded, hits], concurrency, DURATION_S)
                base = one_hop.throughput
                print(
                    f"{concurrency:>4} | {base:>10.0f} {one_hop.percentile_ms(50):>7.2f} | "
                    f"{via.throughput:>11.0f} {via.percentile_ms(50):>7.2f} {via.throughput / base:>7.2f} | "
                    f"{hit.throughput:>13.0f} {hit.percentile_ms(50):>7.2f} {hit.throughput / base:>7.2f} "
                    f"{hit.throughput / via.throughput:>8.2f}",
                    flush=True,
                )
                for name, result in (("direct", one_hop), ("gateway", via), ("cache-hit", hit)):
                    if result.errors:
                        print(f"     {name}: {result.errors} errors, e.g. {result.error_examples[:1]}")

            gateway = psutil.Process(cluster.processes["gateway"].pid)
            workers = gateway.children() or [gateway]
            time.sleep(1.0)
            gateway_cpu, gateway_rps = cpu_per_call(workers, forwarded, 64)
            echo_cpu, echo_rps = cpu_per_call([psutil.Process(echo.pid)], CallSpec(echo_target, PREDICT, distinct), 64)
            print(
                f"\nCPU per call at concurrency 64: gateway forwarding {gateway_cpu * 1e6:.0f} us "
                f"({len(workers)} workers, {gateway_rps:.0f} calls/s), bare grpc.aio echo {echo_cpu * 1e6:.0f} us "
                f"(1 process, {echo_rps:.0f} calls/s): gateway / echo = {gateway_cpu / echo_cpu:.2f}"
            )
        finally:
            echo.terminate()
            echo.wait(10)
            cluster.stop()


if __name__ == "__main__":
    main()
