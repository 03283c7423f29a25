"""Dynamic batching in every family: the same one-row calls with batching on and off.

Run with `make bench`. Each model's service runs as its own process, as `make run` starts it,
and is called directly (no gateway) by several client processes. A row is one dense row, one
small graph (gnn) or one text (nlp). Read the ratios: on/off rows/s should be at least 0.95,
and on's p50 at most 1.1x off's plus 0.2 ms; every row is printed, losses included.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2
from services.dense import torch_form
from services.dense.datasets import digits_split
from services.dense.defaults import CLASS_OUTPUTS, publish_onnx
from services.dense.settings import DenseSettings
from shared.cluster import free_port, health_status
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig, OnnxSession
from shared.tensors import from_numpy
from shared.training import ExportableClassifier
from tests.bench.load import CallSpec, LoadResult, run_interleaved
from tests.stores import plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = [int(c) for c in os.environ.get("MAAS_BENCH_CONCURRENCY", "1,16,64").split(",")]
MODELS = os.environ.get("MAAS_BENCH_MODELS", "wide-mlp,digits-cnn,digits-mlp,karate-gcn,sentiment").split(",")
QUEUE_DELAY_US = os.environ.get("MAAS_BENCH_QUEUE_DELAY_US", str(DenseSettings().max_queue_delay_us))
# Unset: the services' own default.
CONCURRENT_BATCHES = os.environ.get("MAAS_BENCH_CONCURRENT_BATCHES")


@dataclass(frozen=True)
class Family:
    name: str
    module: str
    method: str


FAMILIES = {
    "dense": Family("dense", "services.dense", "/maas.dense.v1.DenseService/Predict"),
    "gnn": Family("gnn", "services.gnn", "/maas.gnn.v1.GnnService/Predict"),
    "nlp": Family("nlp", "services.nlp", "/maas.nlp.v1.NlpService/Predict"),
}
FAMILY_OF = {"karate-gcn": "gnn", "sentiment": "nlp", "minilm-l6-v2": "nlp"}


def build_wide_mlp(store: ModelStore) -> None:
    """A compute-heavy dense model (64-4096-4096-10, 17M weights, seeded random): per-row compute
    outweighs the per-call gRPC cost, as with real production models; the digits models are
    too small for that on a CPU."""
    torch.manual_seed(0)
    form = {"architecture": "mlp", "input_shape": [64], "hidden_sizes": [4096, 4096], "outputs": 10,
            "task": "classification"}  # fmt: skip
    net = torch_form.build_net(form)
    publish_onnx(
        store,
        ExportableClassifier(net),
        torch.zeros(1, 64),
        {
            "name": "wide-mlp",
            "inputs": [{"name": "pixels", "dtype": "FP32", "shape": [-1, 64]}],
            "outputs": CLASS_OUTPUTS,
            "source": "bench: random weights",
            "config": {"architecture": "mlp", "dataset": "none"},
        },
        net,
        form,
    )


def dense_input(name: str, rows: int = 1) -> tuple[str, np.ndarray]:
    _, x_test, _, _ = digits_split()
    if name == "digits-cnn":
        return "image", x_test[:rows].reshape(rows, 1, 8, 8)
    return "pixels", x_test[:rows]


def requests_for(model: str, count: int = 64) -> tuple[bytes, ...]:
    """Distinct one-row calls: one dense row, one small graph, or one text."""
    rng = np.random.default_rng(0)
    family = FAMILY_OF.get(model, "dense")
    if family == "gnn":
        calls = []
        for _ in range(count):
            nodes = int(rng.integers(8, 16))
            graph = gnn_pb2.Graph(
                node_features=from_numpy(rng.random((nodes, 34), dtype=np.float32)),
                edge_index=from_numpy(rng.integers(0, nodes, size=(2, nodes * 2)).astype(np.int64)),
            )
            calls.append(gnn_pb2.PredictRequest(model_name=model, graph=graph, node_ids=[0]))
    elif family == "nlp":
        words = "the service answered quickly and the results were good but slow on mondays".split()
        calls = [
            nlp_pb2.PredictRequest(model_name=model, texts=[" ".join(rng.choice(words, 8))]) for _ in range(count)
        ]
    else:
        name, row = dense_input(model)
        calls = [
            dense_pb2.PredictRequest(model_name=model, inputs={name: from_numpy(row + i % 3)}) for i in range(count)
        ]
    return tuple(call.SerializeToString() for call in calls)


def start_service(family: Family, store: Path, batching: bool, extra_env: dict[str, str] | None = None):
    """A model service as its own process, as `make run` starts it."""
    port = free_port()
    prefix = f"MAAS_{family.name.upper()}_"
    env = {
        **os.environ,
        f"{prefix}PORT": str(port),
        f"{prefix}MODEL_STORE": str(store),
        f"{prefix}BATCHING": str(batching).lower(),
        f"{prefix}MAX_QUEUE_DELAY_US": QUEUE_DELAY_US,
        f"{prefix}STORE_POLL_S": "0",
        f"{prefix}LOG_LEVEL": "WARNING",
        **({f"{prefix}MAX_CONCURRENT_BATCHES": CONCURRENT_BATCHES} if CONCURRENT_BATCHES else {}),
        **(extra_env or {}),
    }
    process = subprocess.Popen([sys.executable, "-m", family.module], env=env)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while health_status(target) != 1:  # SERVING
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the {family.name} service did not start")
        time.sleep(0.2)
    return process, target


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(60)


def in_process_rows_per_s(store: ModelStore, model: str, batch: int) -> float:
    """ONNX Runtime called directly in this process, one thread, `batch` rows per call."""
    manifest = store.manifest(model, store.default_version(model))
    session = OnnxSession(store.verify(manifest) / manifest.config["onnx_file"], OnnxConfig(device="cpu"))
    name, rows = dense_input(model, batch)
    feed = {name: rows}
    stop_at = time.monotonic() + DURATION_S / 2
    calls, start = 0, time.monotonic()
    while time.monotonic() < stop_at:
        session.run(feed)
        calls += 1
    return calls * batch / (time.monotonic() - start)


def verdict(off: LoadResult, on: LoadResult) -> str:
    ok = on.throughput >= 0.95 * off.throughput and on.percentile_ms(50) <= 1.1 * off.percentile_ms(50) + 0.2
    return "ok" if ok else "LOSS"


def bench_model(store: ModelStore, model: str) -> None:
    family = FAMILIES[FAMILY_OF.get(model, "dense")]
    spec_requests = requests_for(model)
    results: dict[tuple[bool, int], LoadResult] = {}
    # Both services run side by side (the idle one costs nothing) and the clients switch between
    # them every slice, so drift on a shared machine hits both alike.
    off_process, off_target = start_service(family, store.root, batching=False)
    on_process, on_target = start_service(family, store.root, batching=True)
    try:
        for concurrency in CONCURRENCY:
            specs = [CallSpec(target, family.method, spec_requests) for target in (off_target, on_target)]
            off, on = run_interleaved(specs, concurrency, DURATION_S)
            results[False, concurrency], results[True, concurrency] = off, on
    finally:
        stop(off_process)
        stop(on_process)
    print(
        f"\n{family.name} service called directly, {model}, 1 row per call, max_queue_delay_us={QUEUE_DELAY_US}, "
        f"max_concurrent_batches={CONCURRENT_BATCHES or 'default'}, {DURATION_S:.0f}s per cell, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'conc':>4} | {'off rows/s':>10} {'p50 ms':>7} {'p99 ms':>7} | {'on rows/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} | {'on/off':>6} | p50 on/off | verdict"
    )
    for concurrency in CONCURRENCY:
        off, on = results[False, concurrency], results[True, concurrency]
        print(
            f"{concurrency:>4} | {off.throughput:>10.0f} {off.percentile_ms(50):>7.2f} {off.percentile_ms(99):>7.2f} | "
            f"{on.throughput:>9.0f} {on.percentile_ms(50):>7.2f} {on.percentile_ms(99):>7.2f} | "
            f"{on.throughput / off.throughput:>6.2f} | {on.percentile_ms(50) / off.percentile_ms(50):>10.2f} | "
            f"{verdict(off, on)}",
            flush=True,
        )
        if off.errors or on.errors:
            print(f"     errors: off {off.errors}, on {on.errors}: {(off.error_examples + on.error_examples)[:2]}")
    if family.name == "dense":
        single = statistics.median(in_process_rows_per_s(store, model, 1) for _ in range(3))
        batched = statistics.median(in_process_rows_per_s(store, model, 64) for _ in range(3))
        best = max(results.values(), key=lambda r: r.throughput).throughput
        print(
            f"in-process ONNX Runtime, {model}, one thread: {single:.0f} rows/s at 1 row per call, {batched:.0f} "
            f"rows/s at 64 rows per call; best served: {best / single:.2f}x the first, {best / batched:.2f}x the second"
        )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = plain_defaults(Path(tmp) / "models")
        if "wide-mlp" in MODELS:
            build_wide_mlp(store)
        for model in MODELS:
            bench_model(store, model)


if __name__ == "__main__":
    main()
