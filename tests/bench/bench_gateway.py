"""The gateway against a bare grpc.aio echo server, a one-hop call to the dense service, cache hits,
and the CPU each call costs.

Run with `make bench`. The cluster runs as `make run` starts it (the gateway with one worker
per core). In each row the clients switch between the kinds of call every slice, so drift on a
shared machine hits them alike: read the ratios, all against the echo server of the same run.

- echo: a bare grpc.aio server answering each call with its request bytes (one process): the
  floor of one Python gRPC hop;
- direct: digits-mlp calls straight to the dense service (one hop, with the model);
- gateway / OIP uncached: the same calls through the gateway, natively and as Open Inference
  ModelInfer, all distinct and `no-store`, so nothing is coalesced or cached: pure forwarding;
- gateway / OIP hit: one call repeated through the gateway, answered from each worker's memory;
- stream uncached / hit: the same Open Inference calls as ModelStreamInfer messages, one stream
  per caller, one message at a time on it (as perf_analyzer --streaming sends them);
- "hop unbatched": a second gateway on the same dense service with MAAS_GATEWAY_HOP_BATCHING=false,
  every request its own call to the dense service, beside the default (merged while busy).
- "hop 2 in flight": a third gateway whose lanes keep two merged calls in flight to the one dense
  replica (MAAS_GATEWAY_HOP_MAX_IN_FLIGHT=2) instead of the default one.

H1 asks, at concurrency 64, for uncached Open Inference calls at 0.7x the echo server or more;
H2 for hits at 0.9x or more; H3 for ModelStreamInfer at 1.5x or more. H4 is the gateway's CPU
time per forwarded call (all workers, user + system) beside the echo server's, in the same run
(the median of three runs of each, in turn). The last line adds up each kind's CPU budget per call,
the clients' included: the clients and servers share the cores, so the budgets' ratio is about the
ratio of the rows' calls/s, and says which process a row's rate is spent in.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from inference import open_inference_pb2 as oip
from maas.dense.v1 import dense_pb2
from shared.cluster import ClusterPorts, LocalCluster, free_port
from shared.tensors import from_numpy
from tests.bench.echo_server import start_echo
from tests.bench.load import CallSpec, run_interleaved, run_load
from tests.metrics import hop_batch_totals
from tests.stores import plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = [int(c) for c in os.environ.get("MAAS_BENCH_CONCURRENCY", "1,16,64").split(",")]
PREDICT = "/maas.dense.v1.DenseService/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
NO_STORE = (("cache-control", "no-store"),)
CPU_TURNS = 3  # runs of each kind for the CPU figures, in turn


def distinct_requests(count: int = 4096) -> tuple[bytes, ...]:
    """Calls that differ, so the gateway can neither coalesce nor cache them: pure forwarding."""
    rows = np.random.default_rng(0).integers(0, 17, size=(count, 1, 64)).astype(np.float32)
    return tuple(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(row)}).SerializeToString()
        for row in rows
    )


def distinct_infer_requests(count: int = 4096) -> tuple[bytes, ...]:
    """The same rows as distinct_requests, as Open Inference ModelInfer requests with raw contents."""
    rows = np.random.default_rng(0).integers(0, 17, size=(count, 1, 64)).astype(np.float32)
    tensor = oip.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])
    return tuple(
        oip.ModelInferRequest(model_name="digits-mlp", id=f"bench-{i}", inputs=[tensor],
                              raw_input_contents=[row.tobytes()]).SerializeToString()
        for i, row in enumerate(rows)
    )  # fmt: skip


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


@dataclasses.dataclass(frozen=True)
class CallCost:
    """CPU seconds per call, from one run of one kind of call."""

    servers: float  # in the processes measured
    also: float  # in the other processes named
    clients: float  # in the load generator's client processes
    rate: float  # calls/s

    def budget(self) -> float:
        return self.servers + self.also + self.clients


def median_cost(costs: list[CallCost]) -> CallCost:
    """Each figure's median over several runs."""
    return CallCost(*(statistics.median(getattr(c, f.name) for c in costs) for f in dataclasses.fields(CallCost)))


def cpu_per_call(processes: list[psutil.Process], spec: CallSpec, concurrency: int,
                 also: list[psutil.Process] = ()) -> CallCost:  # fmt: skip
    """What one run of `spec` costs per call in `processes`, in `also` and in the clients."""
    before, before_also = cpu_seconds(processes), cpu_seconds(also)
    result = run_load(spec, concurrency, DURATION_S, warmup_s=0.0)
    spent, spent_also = cpu_seconds(processes) - before, cpu_seconds(also) - before_also
    # Calls that started before or ended after the window used CPU too; count every one sent.
    calls = max(1, result.client_calls)
    return CallCost(spent / calls, spent_also / calls, result.client_cpu_s / calls, result.throughput)


def start_gateway_variant(cluster: LocalCluster, var: Path, name: str, settings: dict[str, str]) -> str:
    """A second gateway like the cluster's, on the same dense service, with `settings` changed; its target."""
    spec = cluster.specs["gateway"]
    port, run_dir = free_port(), var / "run" / name
    env = {**spec.env, "MAAS_GATEWAY_PORT": str(port), "MAAS_GATEWAY_METRICS_PORT": str(free_port()),
           "MAAS_GATEWAY_HTTP_PORT": str(free_port()), **settings}  # fmt: skip
    local_env = {**spec.local_env, "MAAS_GATEWAY_RUN_DIR": str(run_dir)}
    cluster.specs[name] = dataclasses.replace(spec, name=name, port=port, env=env, run_dir=run_dir,
                                              local_env=local_env)  # fmt: skip
    cluster.start_process(name)
    cluster.wait_serving(name)
    return cluster.specs[name].target


def main() -> None:
    distinct, infers = distinct_requests(), distinct_infer_requests()
    with tempfile.TemporaryDirectory() as var:
        store = plain_defaults(Path(var) / "models")
        cluster = LocalCluster(ClusterPorts.free(), store.root, Path(var), log_dir=Path(var) / "logs")
        cluster.start()
        echo, echo_target = start_echo()
        try:
            unbatched = start_gateway_variant(cluster, Path(var), "gateway-unbatched",
                                              {"MAAS_GATEWAY_HOP_BATCHING": "false"})  # fmt: skip
            two_in_flight = start_gateway_variant(cluster, Path(var), "gateway-two-in-flight",
                                                  {"MAAS_GATEWAY_HOP_MAX_IN_FLIGHT": "2"})  # fmt: skip
            gateway_spec = cluster.specs["gateway"]
            forwarded = CallSpec(gateway_spec.target, PREDICT, distinct, NO_STORE)
            repeated = tuple(infers[0].replace(b"bench-0", f"bench-{i}".encode()) for i in range(10))
            kinds = {
                "echo": CallSpec(echo_target, PREDICT, distinct),
                "direct": CallSpec(cluster.specs["dense"].target, PREDICT, distinct),
                "gateway uncached": forwarded,
                "  hop unbatched": CallSpec(unbatched, PREDICT, distinct, NO_STORE),
                "  hop 2 in flight": CallSpec(two_in_flight, PREDICT, distinct, NO_STORE),
                "gateway hit": CallSpec(gateway_spec.target, PREDICT, distinct[:1]),
                "OIP uncached": CallSpec(gateway_spec.target, MODEL_INFER, infers, NO_STORE),
                "  hop unbatched ": CallSpec(unbatched, MODEL_INFER, infers, NO_STORE),
                # Other ids, one entry: the id is not part of the key.
                "OIP hit": CallSpec(gateway_spec.target, MODEL_INFER, repeated),
                # One stream per caller, one message at a time on it.
                "stream uncached": CallSpec(gateway_spec.target, MODEL_STREAM_INFER, infers, NO_STORE, streaming=True),
                "stream hit": CallSpec(gateway_spec.target, MODEL_STREAM_INFER, repeated, streaming=True),
            }  # fmt: skip
            print(
                f"\ngateway, digits-mlp, 1 row per call, {gateway_spec.workers} gateway workers, "
                f"{DURATION_S:.0f}s per cell, {os.cpu_count()} cores; calls/s (x echo) and p99 ms"
            )
            header = " | ".join(f"c{c:<3} {'rps':>6} {'x echo':>6} {'p99':>6}" for c in CONCURRENCY)
            rows: dict[str, list[str]] = {name: [] for name in kinds}
            errors: list[str] = []
            for concurrency in CONCURRENCY:
                results = dict(zip(kinds, run_interleaved(list(kinds.values()), concurrency, DURATION_S), strict=True))
                base = results["echo"].throughput
                for name, result in results.items():
                    rows[name].append(f"{'':4} {result.throughput:>6.0f} {result.throughput / base:>6.2f} "
                                      f"{result.percentile_ms(99):>6.1f}")  # fmt: skip
                    if result.errors:
                        example = result.error_examples[:1]
                        errors.append(f"c{concurrency} {name}: {result.errors} errors, e.g. {example}")
            print(f"{'':18} | {header}")
            for name, cells in rows.items():
                print(f"{name:<18} | {' | '.join(cells)}")
            for line in errors:
                print(f"     {line}")

            gateway = psutil.Process(cluster.processes["gateway"].pid)
            workers = gateway.children() or [gateway]
            time.sleep(1.0)
            dense = psutil.Process(cluster.processes["dense"].pid)
            metrics_port = gateway_spec.env["MAAS_GATEWAY_METRICS_PORT"]
            plain = psutil.Process(cluster.processes["gateway-unbatched"].pid)
            # Each kind three times, the kinds in turn, and the median of each: drift on the shared machine
            # moves a kind's CPU per call by a quarter from one minute to the next.
            costs: dict[str, list[CallCost]] = {"forward": [], "unbatched": [], "echo": [], "direct": []}
            sent = [0.0, 0.0]
            for _ in range(CPU_TURNS):
                sent_before = hop_batch_totals(metrics_port)
                costs["forward"].append(cpu_per_call(workers, forwarded, 64, [dense, *dense.children()]))
                sent = [s + after - before for s, after, before in zip(sent, hop_batch_totals(metrics_port),
                                                                       sent_before, strict=True)]  # fmt: skip
                costs["unbatched"].append(cpu_per_call(plain.children() or [plain], kinds["  hop unbatched"], 64))
                costs["echo"].append(cpu_per_call([psutil.Process(echo.pid)], kinds["echo"], 64))
                costs["direct"].append(cpu_per_call([dense, *dense.children()], kinds["direct"], 64))
            fw, un, ec, dc = (median_cost(costs[k]) for k in ("forward", "unbatched", "echo", "direct"))
            print(
                f"\nCPU per call at concurrency 64: gateway forwarding {fw.servers * 1e6:.0f} us "
                f"({len(workers)} workers, {fw.rate:.0f} calls/s), bare grpc.aio echo {ec.servers * 1e6:.0f} us "
                f"(1 process, {ec.rate:.0f} calls/s): gateway / echo = {fw.servers / ec.servers:.2f}; "
                f"with the hop unbatched {un.servers * 1e6:.0f} us ({un.rate:.0f} calls/s): "
                f"{un.servers / ec.servers:.2f}"
            )
            print(
                f"Forwarded calls at concurrency 64: the dense service spent {fw.also * 1e6:.0f} us of CPU per call; "
                f"each call the gateway sent it carried {sent[0] / max(1.0, sent[1]):.2f} requests on average"
            )
            # Clients and servers share the machine's cores, so a kind's rate goes as one over the CPU that
            # everything spends on one of its calls: the budgets' ratio predicts the rows' ratio.
            print(
                f"CPU budget per call at concurrency 64, clients + servers: echo {ec.clients * 1e6:.0f} + "
                f"{ec.servers * 1e6:.0f} us; direct {dc.clients * 1e6:.0f} + {dc.servers * 1e6:.0f} us (dense); "
                f"forwarded {fw.clients * 1e6:.0f} + {fw.servers * 1e6:.0f} (gateway) + {fw.also * 1e6:.0f} us "
                f"(dense). Echo's budget over forwarded's: {ec.budget() / fw.budget():.2f} "
                f"(calls/s: {fw.rate / ec.rate:.2f}); "
                f"over direct's: {ec.budget() / dc.budget():.2f} (calls/s: {dc.rate / ec.rate:.2f})"
            )
        finally:
            echo.terminate()
            echo.wait(10)
            cluster.stop()


if __name__ == "__main__":
    main()
