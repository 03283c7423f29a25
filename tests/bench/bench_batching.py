"""Dynamic batching on the dense service: the same 1-row calls with batching on and off.

Run with `make bench`. Each cell also shows in-process ONNX Runtime on the same model, measured
in the same run, as the ceiling a server could approach. Ratios are what to read.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.defaults import ensure_defaults
from services.dense.architectures import MLP
from services.dense.datasets import digits_split
from services.dense.defaults import CLASS_OUTPUTS, publish_onnx
from shared.cluster import free_port, health_status
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig, OnnxSession
from shared.settings import DenseSettings
from shared.tensors import from_numpy
from shared.training import ExportableClassifier
from tests.bench.load import closed_loop

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = [int(c) for c in os.environ.get("MAAS_BENCH_CONCURRENCY", "1,16,64").split(",")]
MODELS = os.environ.get("MAAS_BENCH_MODELS", "wide-mlp,digits-cnn").split(",")
QUEUE_DELAY_US = os.environ.get("MAAS_BENCH_QUEUE_DELAY_US", str(DenseSettings().max_queue_delay_us))


def build_wide_mlp(store: ModelStore) -> None:
    """A compute-heavy dense model (64-4096-4096-10, 17M weights, seeded random): per-row compute
    outweighs the per-call gRPC cost, as with real production models; the digits models are
    too small for that on a CPU."""
    torch.manual_seed(0)
    publish_onnx(
        store,
        ExportableClassifier(MLP(64, [4096, 4096], 10)),
        torch.zeros(1, 64),
        {
            "name": "wide-mlp",
            "inputs": [{"name": "pixels", "dtype": "FP32", "shape": [-1, 64]}],
            "outputs": CLASS_OUTPUTS,
            "source": "bench: random weights",
            "config": {"architecture": "mlp", "dataset": "none"},
        },
    )


def model_input(name: str) -> tuple[str, np.ndarray]:
    _, x_test, _, _ = digits_split()
    if name == "digits-cnn":
        return "image", x_test[:1].reshape(1, 1, 8, 8)
    return "pixels", x_test[:1]


def start_dense(store: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    """The dense service as its own process, as `make run` starts it."""
    port = free_port()
    env = {
        **os.environ,
        "MAAS_DENSE_PORT": str(port),
        "MAAS_DENSE_MODEL_STORE": str(store),
        "MAAS_DENSE_BATCHING": str(batching).lower(),
        "MAAS_DENSE_MAX_QUEUE_DELAY_US": QUEUE_DELAY_US,
        "MAAS_DENSE_STORE_POLL_S": "0",
        "MAAS_DENSE_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.dense"], env=env)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while health_status(target) != 1:  # SERVING
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the dense service did not start")
        time.sleep(0.2)
    return process, target


async def measure(target: str, model: str, concurrency: int):
    name, array = model_input(model)
    request = dense_pb2.PredictRequest(model_name=model, inputs={name: from_numpy(array)})
    async with grpc.aio.insecure_channel(target) as channel:
        stub = dense_pb2_grpc.DenseServiceStub(channel)
        return await closed_loop(lambda: stub.Predict(request, timeout=30), concurrency, DURATION_S)


def in_process_rows_per_s(store: ModelStore, model: str, batch: int, threads: int) -> float:
    """ONNX Runtime called directly in this process, `threads` callers, `batch` rows per call."""
    manifest = store.manifest(model, store.default_version(model))
    session = OnnxSession(store.verify(manifest) / manifest.config["onnx_file"], OnnxConfig(device="cpu"))
    name, row = model_input(model)
    feed = {name: np.repeat(row, batch, axis=0)}
    stop_at = time.monotonic() + DURATION_S / 2

    def worker() -> int:
        calls = 0
        while time.monotonic() < stop_at:
            session.run(feed)
            calls += 1
        return calls

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        calls = sum(pool.map(lambda _: worker(), range(threads)))
    return calls * batch / (time.monotonic() - start)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "models")
        shutil.copytree(Path("var/models"), store.root)
        ensure_defaults(store)
        if "wide-mlp" in MODELS:
            build_wide_mlp(store)
        for model in MODELS:
            await bench_model(store, model)


async def bench_model(store: ModelStore, model: str) -> None:
    results = {}
    for batching in (False, True):
        process, target = start_dense(store.root, batching)
        try:
            for concurrency in CONCURRENCY:
                results[batching, concurrency] = await measure(target, model, concurrency)
        finally:
            process.terminate()
            process.wait(30)
    print(
        f"\ndynamic batching, dense service called directly, {model}, 1 row per call, max_queue_delay_us="
        f"{QUEUE_DELAY_US}, {DURATION_S:.0f}s per cell, {os.cpu_count()} cores"
    )
    print(
        f"{'conc':>4} | {'off rows/s':>10} {'p50 ms':>7} {'p99 ms':>7} | {'on rows/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} | {'on/off':>6}"
    )
    for concurrency in CONCURRENCY:
        off, on = results[False, concurrency], results[True, concurrency]
        print(
            f"{concurrency:>4} | {off.throughput:>10.0f} {off.percentile_ms(50):>7.2f} {off.percentile_ms(99):>7.2f} | "
            f"{on.throughput:>9.0f} {on.percentile_ms(50):>7.2f} {on.percentile_ms(99):>7.2f} | "
            f"{on.throughput / off.throughput:>6.2f}",
            flush=True,
        )
        if off.errors or on.errors:
            print(f"     errors: off {off.errors}, on {on.errors}")
    single = statistics.median(in_process_rows_per_s(store, model, 1, 1) for _ in range(3))
    batched = statistics.median(in_process_rows_per_s(store, model, 64, 1) for _ in range(3))
    best = max(results.values(), key=lambda r: r.throughput).throughput
    print(
        f"in-process ONNX Runtime, {model}, one thread: {single:.0f} rows/s at 1 row per call, {batched:.0f} rows/s "
        f"at 64 rows per call; best served: {best / single:.2f}x the first, {best / batched:.2f}x the second"
    )


if __name__ == "__main__":
    asyncio.run(main())
