"""Inline runs: the dense service running quick batches on its event loop, against the same service
handing every batch to an inference thread (MAAS_DENSE_INLINE_RUN_US=0).

Run with `make bench`. Two dense services side by side on the same store, as `make run` starts
them but for that one setting; 1-row calls straight to each, the clients switching between them
every slice. digits-mlp runs in tens of microseconds, so with the default its batches run inline;
wide-mlp takes milliseconds a row, so its batches go to the inference threads with either setting
(its row is the check that a slow model is left as it was). Then each service's CPU per call at
concurrency 64, the median of three runs of each, in turn.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import psutil

from tests.bench.bench_batching import FAMILIES, build_wide_mlp, requests_for, start_service, stop
from tests.bench.load import CallSpec, run_interleaved, run_load
from tests.stores import plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
CONCURRENCY = [int(c) for c in os.environ.get("MAAS_BENCH_CONCURRENCY", "1,16,64").split(",")]
CPU_TURNS = 3


def cpu_per_call(process: psutil.Process, spec: CallSpec) -> float:
    """The service's CPU seconds (all its processes) per call over one run at concurrency 64."""
    processes = [process, *process.children()]
    before = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
    result = run_load(spec, 64, DURATION_S, warmup_s=0.0)
    spent = sum(p.cpu_times().user + p.cpu_times().system for p in processes) - before
    return spent / max(1, result.client_calls)


def main() -> None:
    dense = FAMILIES["dense"]
    with tempfile.TemporaryDirectory() as tmp:
        store = plain_defaults(Path(tmp) / "models")
        build_wide_mlp(store)
        # The services' own batching defaults (no queue delay), one with inline runs off.
        env = {"MAAS_DENSE_MAX_QUEUE_DELAY_US": "0"}
        services = [
            start_service(dense, store.root, batching=True, extra_env={**env, "MAAS_DENSE_INLINE_RUN_US": value})
            for value in ("100", "0")
        ]
        try:
            print(f"\ninline runs, 1 row per call, {os.cpu_count()} cores: calls/s with inline runs (the default, "
                  "100 us) and without (0), and their ratio")  # fmt: skip
            header = " | ".join(f"c{c:<3} {'inline':>7} {'off':>7} {'ratio':>6}" for c in CONCURRENCY)
            print(f"{'':11} | {header}")
            specs = {}
            for model in ("digits-mlp", "wide-mlp"):
                requests = requests_for(model)
                specs[model] = [CallSpec(target, dense.method, requests) for _, target in services]
                cells = []
                for concurrency in CONCURRENCY:
                    inline, off = run_interleaved(specs[model], concurrency, DURATION_S)
                    cells.append(f"{'':4} {inline.throughput:>7.0f} {off.throughput:>7.0f} "
                                 f"{inline.throughput / off.throughput:>6.2f}")  # fmt: skip
                print(f"{model:<11} | {' | '.join(cells)}")
            processes = [psutil.Process(process.pid) for process, _ in services]
            costs: list[list[float]] = [[], []]
            for _ in range(CPU_TURNS):
                for i, process in enumerate(processes):
                    costs[i].append(cpu_per_call(process, specs["digits-mlp"][i]))
            inline_us, off_us = (statistics.median(c) * 1e6 for c in costs)
            print(f"digits-mlp at concurrency 64, the dense service's CPU per call: {inline_us:.0f} us inline, "
                  f"{off_us:.0f} us off: {inline_us / off_us:.2f}x")  # fmt: skip
        finally:
            for process, _ in services:
                stop(process)


if __name__ == "__main__":
    main()
