"""Graphs: neighbourhood queries on a large stored graph, graph classification batching, memory.

Run with `make bench`. Ratios are against a baseline taken in the same run:
- k-hop query (2 hops, fan-out 10, 1 node) served on a 1M-node graph vs a 10k-node graph with the
  same average degree, both stored graphs of one gnn service (target: at most 2x);
- graph classification, 1 small graph per call at concurrency 64, batching on vs off, several
  client processes (target: at least 3x), and in process one call of 64 graphs vs 64 calls of one
  (target: at least 10x), each with the classifier on torch (the default) and on ONNX Runtime; beside
  them, health Check calls/s on the same service and clients: the most this machine's gRPC serves, which
  the batched figure approaches (the clients share the cores with the service);
- resident memory of a service holding the 1M-node graph, and of a second replica that maps the
  same files: Pss below Rss on the graph's mappings shows the pages are shared; the same for a sealed
  store, whose graphs are decrypted once into a tmpfs directory that both replicas map;
- opening a stored graph (fresh GraphStore, every block list read, nothing sampled yet): the 1M-node
  graph vs the 10k-node graph (target: at most 2x; opening used to stream sha256 over every file).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from grpc_health.v1 import health_pb2

from maas.gnn.v1 import gnn_pb2
from services.gnn.datasets import motif_graphs
from services.gnn.defaults import MOTIF_GIN, SBM_SAGE
from services.gnn.generators import block_model_graph
from services.gnn.graph_store import GraphStore
from services.gnn.plaintext_cache import PlaintextCache
from services.gnn.runtime import GraphInput, gnn_loader
from shared.families import family
from shared.keyring import Keyring, create_kek
from shared.model_store import ModelStore, sha256_file
from shared.onnx_session import OnnxConfig
from shared.tensors import from_numpy
from tests.bench.bench_batching import start_service, stop
from tests.bench.load import CallSpec, run_interleaved
from tests.stores import copy_store, plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
BIG_NODES = int(os.environ.get("MAAS_BENCH_GRAPH_NODES", "1000000"))
SMALL_NODES = 10_000
GNN = family("gnn")
PREDICT = f"/{GNN.service}/Predict"
CLASSIFY = f"/{GNN.service}/ClassifyGraphs"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def store_graph(graphs: GraphStore, name: str, num_nodes: int) -> float:
    """Generates and stores an SBM graph; returns the seconds generation took (vectorised)."""
    started = time.perf_counter()
    g = block_model_graph(num_nodes)
    generated = time.perf_counter() - started
    graphs.publish_edges(name, g.edge_index, g.node_features, undirected=True)
    return generated


def query_requests(graph: str, num_nodes: int, count: int = 256) -> tuple[bytes, ...]:
    rng = np.random.default_rng(1)
    return tuple(
        gnn_pb2.PredictRequest(
            model_name=SBM_SAGE, stored_graph=graph, node_ids=[int(node)], fan_outs=[10, 10]
        ).SerializeToString()
        for node in rng.integers(0, num_nodes, count)
    )


def graph_mappings(pid: int, directory: Path) -> dict[str, int]:
    """Rss, Pss and Shared (clean + dirty: tmpfs pages count as dirty) in kB over the process's mappings of files
    under `directory`, and its total Rss."""
    totals = {"Rss": 0, "Pss": 0, "Shared_Clean": 0, "Shared_Dirty": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = str(directory) in line
        elif inside:
            key, _, value = line.partition(":")
            if key in totals:
                totals[key] += int(value.split()[0])
    totals["Shared"] = totals.pop("Shared_Clean") + totals.pop("Shared_Dirty")
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    totals["process_Rss"] = int(re.search(r"^Rss:\s+(\d+)", rollup, re.M).group(1))
    return totals


def bench_queries(store: ModelStore) -> None:
    graphs = GraphStore(store)
    big_s = store_graph(graphs, "sbm-big", BIG_NODES)
    store_graph(graphs, "sbm-small", SMALL_NODES)
    big = bench_open(store, graphs)
    print(f"generated the {BIG_NODES}-node SBM graph ({big.num_edges} directed edges) in {big_s:.1f}s")

    process, target = start_service(GNN, store.root, batching=True)
    second = None
    try:
        specs = [
            CallSpec(target, PREDICT, query_requests("sbm-small", SMALL_NODES)),
            CallSpec(target, PREDICT, query_requests("sbm-big", BIG_NODES)),
        ]
        run_interleaved(specs, 1, 0.5, clients=1, warmup_s=0.1, slices=1)  # the service opens both graphs
        small, large = run_interleaved(specs, 1, DURATION_S, clients=1)
        ratio = large.percentile_ms(50) / small.percentile_ms(50)
        print("k-hop query served, 2 hops, fan-out 10, 1 node, one caller (sbm-sage, GraphSAGE)")
        print(f"{'graph':>12} | {'nodes':>9} | {'queries/s':>9} | {'p50 ms':>7} | {'p99 ms':>7}")
        for name, nodes, result in (("sbm-small", SMALL_NODES, small), ("sbm-big", BIG_NODES, large)):
            print(f"{name:>12} | {nodes:>9} | {result.throughput:>9.0f} | {result.percentile_ms(50):>7.2f} | "
                  f"{result.percentile_ms(99):>7.2f}")  # fmt: skip
        print(f"p50 {BIG_NODES} / {SMALL_NODES} nodes: {ratio:.2f}x (target <= 2x) -> {'ok' if ratio <= 2 else 'LOSS'}")

        # Memory: a second replica maps the same files; both touch the big graph's pages.
        second, second_target = start_service(GNN, store.root, batching=True)
        spec = CallSpec(second_target, PREDICT, query_requests("sbm-big", BIG_NODES, 4096))
        run_interleaved([spec, CallSpec(target, PREDICT, spec.requests)], 8, DURATION_S, clients=2)
        directory = graphs.store.root
        print(f"\nresident memory (kB) with the {BIG_NODES}-node graph "
              f"({sum(f.stat().st_size for f in graphs.store.version_dir('sbm-big', 1).glob('*.npy')) // 1024} kB "
              "of .npy files) mapped by two replicas")  # fmt: skip
        print(f"{'replica':>8} | {'process Rss':>11} | {'graph Rss':>9} | {'graph Pss':>9} | graph Shared")
        for name, pid in (("first", process.pid), ("second", second.pid)):
            m = graph_mappings(pid, directory)
            print(f"{name:>8} | {m['process_Rss']:>11} | {m['Rss']:>9} | {m['Pss']:>9} | {m['Shared']:>12}")
        print("graph Pss < graph Rss: the graph's pages are shared between the replicas (page cache), not copied")
    finally:
        stop(process)
        if second is not None:
            stop(second)
    bench_update(graphs)
    # For reference: a full-graph pass on the big graph, which is what the query no longer costs.
    model = load(store, SBM_SAGE)
    from services.gnn.sampling import csr_edge_index

    whole = GraphInput(np.array(big.node_features), csr_edge_index(big.indptr, big.indices))
    started = time.perf_counter()
    model.predict(whole)
    print(f"reference: one full-graph pass of the same model on {BIG_NODES} nodes, in process, one thread: "
          f"{(time.perf_counter() - started) * 1000:.0f} ms")  # fmt: skip


def bench_open(store: ModelStore, graphs: GraphStore):
    """Open time of the big graph against the small one, each from a fresh GraphStore (nothing open yet)."""

    def open_s(name: str) -> float:
        times = []
        for _ in range(7):
            started = time.perf_counter()
            GraphStore(store).open(name)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    small_s, big_s = open_s("sbm-small"), open_s("sbm-big")
    directory = graphs.store.version_dir("sbm-big", 1)
    started = time.perf_counter()
    for path in sorted(directory.glob("*.npy")):
        sha256_file(path)
    whole_s = time.perf_counter() - started
    ratio = big_s / small_s
    print(f"\nopening a stored graph (block lists read, headers checked, arrays mapped): {SMALL_NODES} nodes "
          f"{small_s * 1000:.2f} ms, {BIG_NODES} nodes {big_s * 1000:.2f} ms: {ratio:.2f}x (target <= 2x) -> "
          f"{'ok' if ratio <= 2 else 'LOSS'}")  # fmt: skip
    print(f"for reference, sha256 of every file of the {BIG_NODES}-node graph (what opening cost before): "
          f"{whole_s * 1000:.0f} ms, {whole_s / big_s:.0f}x the open")  # fmt: skip
    return GraphStore(store).open("sbm-big")


def bench_sealed_memory(store: ModelStore) -> None:
    """Two replicas on a sealed copy of the store: the big graph is decrypted once into tmpfs, and both map it."""
    if not Path("/dev/shm").is_dir():
        print("\nno /dev/shm here: the sealed-store memory part is skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        create_kek(Path(tmp) / "keys", "bench")
        sealed = ModelStore(Path(tmp) / "models", Keyring(Path(tmp) / "keys", "bench"))
        started = time.perf_counter()
        copy_store(store, sealed)
        print(f"\nsealed a copy of the store (AES-256-GCM) in {time.perf_counter() - started:.1f}s")
        plaintext = Path("/dev/shm") / f"maas-bench-graphs-{os.getpid()}"
        try:
            bench_sealed_open(sealed, plaintext)
        except BaseException:
            shutil.rmtree(plaintext, ignore_errors=True)
            raise
        env = {"MAAS_GNN_KEYS_DIR": str(Path(tmp) / "keys"), "MAAS_GNN_KEK_ID": "bench",
               "MAAS_GNN_GRAPH_PLAINTEXT_DIR": str(plaintext)}  # fmt: skip
        processes = []
        try:
            for _ in range(2):
                processes.append(start_service(GNN, sealed.root, batching=True, extra_env=env))
            spec = CallSpec(processes[0][1], PREDICT, query_requests("sbm-big", BIG_NODES, 4096))
            run_interleaved([spec, CallSpec(processes[1][1], PREDICT, spec.requests)], 8, DURATION_S, clients=2)
            copies = sum(f.stat().st_size for f in plaintext.rglob("*.npy")) // 1024
            print(f"resident memory (kB), sealed store: the {BIG_NODES}-node graph decrypted once into {plaintext} "
                  f"({copies} kB of .npy for every decrypted graph, mode 0600), mapped by two replicas")  # fmt: skip
            print(f"{'replica':>8} | {'process Rss':>11} | {'graph Rss':>9} | {'graph Pss':>9} | graph Shared")
            for name, (process, _) in zip(("first", "second"), processes, strict=True):
                m = graph_mappings(process.pid, plaintext)
                print(f"{name:>8} | {m['process_Rss']:>11} | {m['Rss']:>9} | {m['Pss']:>9} | {m['Shared']:>12}")
            print("graph Pss < graph Rss: the decrypted pages are shared between the replicas, not decrypted twice")
        finally:
            for process, _ in processes:
                stop(process)
            shutil.rmtree(plaintext, ignore_errors=True)


def bench_update(graphs: GraphStore) -> None:
    """An update of 10 nodes and 60 edges: stored as a delta, its cost and size follow the update, not the graph."""
    rng = np.random.default_rng(3)

    def update(name: str, nodes: int) -> tuple[float, int]:
        base = graphs.open(name)
        features = rng.normal(size=(10, base.feature_width)).astype(np.float32)
        edges = np.stack([np.repeat(np.arange(nodes, nodes + 10), 6), rng.integers(0, nodes, 60)])
        started = time.perf_counter()
        new = graphs.update(name, base.version, features, edges)
        written = sum(f.stat().st_size for f in graphs.store.version_dir(name, new.version).iterdir())
        return time.perf_counter() - started, written

    small_s, small_bytes = update("sbm-small", SMALL_NODES)
    big_s, big_bytes = update("sbm-big", BIG_NODES)
    print(
        f"\nUpdateGraph (10 nodes, 60 edges) stored as a delta: {SMALL_NODES} nodes {small_s * 1000:.1f} ms, "
        f"{small_bytes} bytes written; {BIG_NODES} nodes {big_s * 1000:.1f} ms, {big_bytes} bytes: "
        f"{big_s / small_s:.2f}x the time (a full copy of the big graph is "
        f"{sum(f.stat().st_size for f in graphs.store.version_dir('sbm-big', 1).glob('*.npy')) // 1024} kB)"
    )


def bench_sealed_open(sealed: ModelStore, plaintext: Path) -> None:
    """Opening a sealed graph: the first process on the machine decrypts it into tmpfs, the next ones map that."""

    def open_s(name: str) -> float:
        started = time.perf_counter()
        GraphStore(sealed, plaintext=PlaintextCache.at(plaintext)).open(name)
        return time.perf_counter() - started

    first_s = open_s("sbm-big")
    open_s("sbm-small")
    small_s = statistics.median(open_s("sbm-small") for _ in range(7))
    big_s = statistics.median(open_s("sbm-big") for _ in range(7))
    print(f"opening the sealed {BIG_NODES}-node graph: first on the machine (decrypts into tmpfs) "
          f"{first_s * 1000:.0f} ms; a later replica (maps the copy) {big_s * 1000:.2f} ms vs "
          f"{small_s * 1000:.2f} ms for {SMALL_NODES} nodes: {big_s / small_s:.2f}x")  # fmt: skip


def load(store: ModelStore, name: str, onnx: OnnxConfig | None = None):
    manifest = store.manifest(name, store.default_version(name))
    return gnn_loader(torch.device("cpu"), onnx)(manifest, store.artifacts(manifest))


def bench_graph_batching(store: ModelStore) -> None:
    graphs = motif_graphs(64, seed=11)
    requests = tuple(
        gnn_pb2.ClassifyGraphsRequest(
            model_name=MOTIF_GIN, graphs=[gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(e))]
        ).SerializeToString()
        for x, e, _ in graphs
    )
    for backend, env in (("torch", {}), ("ONNX Runtime", {"MAAS_GNN_ONNX_GRAPH_CLASSIFIERS": "true"})):
        off_process, off_target = start_service(GNN, store.root, batching=False, extra_env=env)
        on_process, on_target = start_service(GNN, store.root, batching=True, extra_env=env)
        try:
            specs = [CallSpec(target, CLASSIFY, requests) for target in (off_target, on_target)]
            # The ceiling: health Check through the same server, clients and interceptors, no model work.
            specs.append(CallSpec(on_target, HEALTH_CHECK, (health_pb2.HealthCheckRequest().SerializeToString(),)))
            off, on, ceiling = run_interleaved(specs, 64, DURATION_S)
        finally:
            stop(off_process)
            stop(on_process)
        ratio = on.throughput / off.throughput
        print(f"\ngraph classification served ({MOTIF_GIN} on {backend}), 1 graph of ~25 nodes per call, "
              "concurrency 64")  # fmt: skip
        print(f"{'batching':>8} | {'graphs/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | errors")
        for name, result in (("off", off), ("on", on)):
            print(f"{name:>8} | {result.throughput:>8.0f} | {result.percentile_ms(50):>7.2f} | "
                  f"{result.percentile_ms(99):>7.2f} | {result.errors}")  # fmt: skip
        print(f"on / off: {ratio:.2f}x (target >= 3x) -> {'ok' if ratio >= 3 else 'LOSS'}")
        print(f"ceiling: health Check on the same service and clients {ceiling.throughput:.0f} calls/s; "
              f"batching on reaches {on.throughput / ceiling.throughput:.0%} of it, off "
              f"{off.throughput / ceiling.throughput:.0%}")  # fmt: skip

    torch.set_num_threads(1)
    inputs = [GraphInput(x, e) for x, e, _ in graphs]
    for backend, onnx in (("torch", None), ("ONNX Runtime", OnnxConfig(device="cpu"))):
        model = load(store, MOTIF_GIN, onnx)

        def timed(calls, model=model) -> float:
            started = time.perf_counter()
            model.run_batch(calls)
            return time.perf_counter() - started

        singles = statistics.median(sum(timed([[g]]) for g in inputs) for _ in range(5))
        batched = statistics.median(timed([inputs]) for _ in range(5))
        print(f"in process, {backend}, one thread: 64 single calls {singles * 1000:.1f} ms, one call of 64 graphs "
              f"{batched * 1000:.1f} ms: {singles / batched:.1f}x (target >= 10x) -> "
              f"{'ok' if singles / batched >= 10 else 'LOSS'}")  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # A plain copy: the graphs are memory-mapped (a sealed store decrypts them into memory instead).
        store = plain_defaults(Path(tmp) / "models")
        bench_graph_batching(store)
        bench_queries(store)
        bench_sealed_memory(store)


if __name__ == "__main__":
    main()
