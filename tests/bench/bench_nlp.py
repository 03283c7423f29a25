"""NLP embeddings served against in-process ONNX Runtime, on the same texts, in the same run.

Run with `make bench`. For 1, 8 and 32 texts per call it measures texts/s of:

- in-process: `TextEncoder.embed` (the service's own code: tokeniser, length groups, ONNX
  Runtime) called in a loop by one thread, with the service's ONNX settings (the baseline);
- service: Predict on the nlp service, no gateway, from `MAAS_BENCH_NLP_CONCURRENCY` callers
  (default 4) in client processes, so the dynamic batcher can merge calls;
- gateway: the same calls through the gateway with `cache-control: no-store`.

The in-process baseline is taken before and after the served runs and averaged, so drift on a
shared machine falls on both. The target is served >= 0.8x in-process at 32 texts per call.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from maas.nlp.v1 import nlp_pb2
from services.nlp.datasets import BUILTIN, DATA_DIR, load_builtin
from services.nlp.defaults import MINILM
from services.nlp.runtime import TextEncoder
from shared.cluster import ClusterPorts, LocalCluster
from shared.onnx_session import OnnxConfig
from tests.bench.load import CallSpec, run_interleaved
from tests.stores import plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = int(os.environ.get("MAAS_BENCH_NLP_CONCURRENCY", "4"))
PER_CALL = [int(n) for n in os.environ.get("MAAS_BENCH_NLP_PER_CALL", "1,8,32").split(",")]
PREDICT = "/maas.nlp.v1.NlpService/Predict"
NO_STORE = (("cache-control", "no-store"),)


def bench_texts() -> list[str]:
    """Every text of the built-in sets (sentiment, topics, aspects): short review- and news-like sentences."""
    return [text for name in BUILTIN for text in load_builtin(name).texts]


def calls(texts: list[str], per_call: int) -> list[list[str]]:
    """Consecutive, wrapping groups of `per_call` texts: every call differs from the one before."""
    return [[texts[(start + i) % len(texts)] for i in range(per_call)] for start in range(0, len(texts), per_call)]


def in_process(encoder: TextEncoder, groups: list[list[str]], duration_s: float) -> float:
    """Texts/s of one thread embedding the groups in turn."""
    for group in groups[:3]:
        encoder.embed(group)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < duration_s:
        group = groups[done % len(groups)]
        encoder.embed(group)
        done += 1
    return sum(len(groups[i % len(groups)]) for i in range(done)) / (time.perf_counter() - started)


def main() -> None:
    with tempfile.TemporaryDirectory() as var:
        store = plain_defaults(Path(var) / "models")  # the default models, as `make models` built them
        manifest = store.manifest(MINILM, store.default_version(MINILM))
        # The service's defaults: one intra-op thread per ONNX call (MAAS_NLP_ONNX_INTRA_OP_THREADS), 128 tokens.
        encoder = TextEncoder(manifest, store.artifacts(manifest), OnnxConfig(device="cpu"), 128)
        texts = bench_texts()
        print(f"\nnlp embeddings ({MINILM}, {len(texts)} texts from {DATA_DIR.name}/), {DURATION_S:.0f}s per cell, "
              f"{CONCURRENCY} callers for the served rows, {os.cpu_count()} cores")  # fmt: skip
        cluster = LocalCluster(ClusterPorts.free(), store.root, Path(var), log_dir=Path(var) / "logs")
        cluster.start()
        try:
            print(f"{'texts/call':>10} | {'in-process':>10} | {'service':>9} {'/in-proc':>8} {'p50 ms':>7} | "
                  f"{'gateway':>9} {'/in-proc':>8} {'p50 ms':>7}")  # fmt: skip
            for per_call in PER_CALL:
                groups = calls(texts, per_call)
                requests = tuple(
                    nlp_pb2.PredictRequest(model_name=MINILM, texts=group).SerializeToString() for group in groups
                )
                before = in_process(encoder, groups, DURATION_S / 2)
                direct = CallSpec(cluster.specs["nlp"].target, PREDICT, requests)
                via = CallSpec(cluster.specs["gateway"].target, PREDICT, requests, NO_STORE)
                # Few slices: a call of 32 texts takes a good part of a second on a small machine, and a
                # call cut by a slice boundary is not counted.
                served, forwarded = run_interleaved([direct, via], CONCURRENCY, DURATION_S, slices=2)
                after = in_process(encoder, groups, DURATION_S / 2)
                base = (before + after) / 2
                served_tps, forwarded_tps = served.throughput * per_call, forwarded.throughput * per_call
                print(f"{per_call:>10} | {base:>10.0f} | {served_tps:>9.0f} {served_tps / base:>8.2f} "
                      f"{served.percentile_ms(50):>7.2f} | {forwarded_tps:>9.0f} {forwarded_tps / base:>8.2f} "
                      f"{forwarded.percentile_ms(50):>7.2f}", flush=True)  # fmt: skip
                for name, result in (("service", served), ("gateway", forwarded)):
                    if result.errors:
                        print(f"     {name}: {result.errors} errors, e.g. {result.error_examples[:1]}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
