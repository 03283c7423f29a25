"""Recommendations: users served per second at 1 and 64 users per call, and the cost of a call on a
1M-interaction user-item graph against the default 12k-interaction one.

Run with `make bench`. Both graphs are user-item graphs of the default recommender (shop-lightgcn), stored
in one gnn service: the default `shop-interactions` (600 users, 300 items, 12k interactions), and a copy
grown to 1M interactions by about 50k users the model never saw, drawn from the same planted communities
(they are served from their interactions, by propagation, without retraining). Ratios are against the
small graph in the same run (target for the 1M graph's p50 at 1 user per call: at most 2x). The first call
on a graph version builds its propagated table (once per version); its time is shown apart.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from maas.gnn.v1 import gnn_pb2
from services.gnn.defaults import SHOP_GRAPH, SHOP_LIGHTGCN
from services.gnn.graph_store import GraphStore
from services.gnn.sampling import csr_from_edges
from shared.families import family
from shared.model_store import ModelStore
from tests.bench.bench_batching import start_service, stop
from tests.bench.load import CallSpec, run_interleaved
from tests.stores import plain_defaults

DURATION_S = float(os.environ.get("MAAS_BENCH_SECONDS", "4"))
INTERACTIONS = int(os.environ.get("MAAS_BENCH_INTERACTIONS", "1000000"))
GNN = family("gnn")
RECOMMEND = f"/{GNN.service}/Recommend"
BIG = "shop-1m"


def grow(graphs: GraphStore, interactions: int, per_user: int = 20, seed: int = 1) -> tuple[int, int]:
    """A copy of the shop graph with new users, `per_user` interactions each, 85% in a community of their own
    (items' communities are their index mod 6, as planted), until `interactions` in all; returns (users, edges)."""
    base = graphs.open(SHOP_GRAPH)
    features = np.array(base.node_features)
    items = np.flatnonzero(features[:, 0] > 0.5)
    rng = np.random.default_rng(seed)
    first = new_users = base.num_nodes
    found = [np.zeros((2, 0), np.int64)]
    total = base.num_edges // 2
    while total < interactions:  # repeated draws count once: users are added until the interactions are there
        count = max(1, (interactions - total) // per_user)
        users = np.repeat(np.arange(new_users, new_users + count), per_user)
        home = rng.integers(0, 6, count).repeat(per_user)
        own = rng.random(len(users)) < 0.85
        pick = rng.integers(0, len(items) // 6, len(users)) * 6 + home  # an item of the user's community
        chosen = np.where(own, items[pick], rng.choice(items, len(users)))
        found.append(np.unique(np.stack([users, chosen]), axis=1))
        total += found[-1].shape[1]
        new_users += count
    pairs = np.concatenate(found, axis=1)
    edges = np.concatenate([base_edges(base), pairs, pairs[::-1]], axis=1)
    num_nodes, new_users = new_users, new_users - first
    indptr, indices = csr_from_edges(edges, num_nodes)
    grown = np.concatenate([features, np.zeros((new_users, features.shape[1]), np.float32)])
    graphs.publish(BIG, indptr, indices, grown, undirected=True, description="bench: the shop graph grown")
    return new_users, len(indices) // 2


def base_edges(stored) -> np.ndarray:
    from services.gnn.sampling import csr_edge_index

    return csr_edge_index(stored.indptr, stored.indices)


def requests(graph: str, users: np.ndarray, per_call: int, count: int = 256) -> tuple[bytes, ...]:
    rng = np.random.default_rng(2)
    return tuple(
        gnn_pb2.RecommendRequest(model_name=SHOP_LIGHTGCN, stored_graph=graph, user_ids=rng.choice(users, per_call),
                                 top_k=10).SerializeToString()  # fmt: skip
        for _ in range(count)
    )


def first_call_s(target: str, graph: str, user: int) -> float:
    import grpc

    from maas.gnn.v1 import gnn_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = gnn_pb2_grpc.GnnServiceStub(channel)
        started = time.perf_counter()
        stub.Recommend(gnn_pb2.RecommendRequest(model_name=SHOP_LIGHTGCN, stored_graph=graph, user_ids=[user],
                                                top_k=10), timeout=300)  # fmt: skip
        return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = plain_defaults(Path(tmp) / "models")
        graphs = GraphStore(ModelStore(store.root))
        started = time.perf_counter()
        new_users, edges = grow(graphs, INTERACTIONS)
        print(f"grew {SHOP_GRAPH} (12000 interactions) to {BIG}: {edges} interactions, {new_users} new users, in "
              f"{time.perf_counter() - started:.1f}s")  # fmt: skip
        process, target = start_service(GNN, store.root, batching=True)
        try:
            small_users = np.arange(600)
            big_users = np.concatenate([small_users, np.arange(900, 900 + new_users)])
            build = {graph: first_call_s(target, graph, 0) for graph in (SHOP_GRAPH, BIG)}
            print(f"first call on each graph version (builds its propagated table): {SHOP_GRAPH} "
                  f"{build[SHOP_GRAPH] * 1000:.0f} ms, {BIG} {build[BIG] * 1000:.0f} ms")  # fmt: skip
            print("Recommend, top 10, seen items excluded, gnn service, 8 callers over 2 client processes")
            print(f"{'graph':>18} | {'users/call':>10} | {'calls/s':>8} | {'users/s':>8} | {'p50 ms':>7} | "
                  f"{'p99 ms':>7}")  # fmt: skip
            rows = {}
            for per_call in (1, 64):
                specs = [CallSpec(target, RECOMMEND, requests(SHOP_GRAPH, small_users, per_call)),
                         CallSpec(target, RECOMMEND, requests(BIG, big_users, per_call))]  # fmt: skip
                for name, result in zip((SHOP_GRAPH, BIG), run_interleaved(specs, 8, DURATION_S), strict=True):
                    assert not result.errors, result.error_examples
                    rows[name, per_call] = result
                    print(f"{name:>18} | {per_call:>10} | {result.throughput:>8.0f} | "
                          f"{result.throughput * per_call:>8.0f} | {result.percentile_ms(50):>7.2f} | "
                          f"{result.percentile_ms(99):>7.2f}")  # fmt: skip
            ratio = rows[BIG, 1].percentile_ms(50) / rows[SHOP_GRAPH, 1].percentile_ms(50)
            print(f"p50 at 1 user per call, {edges} / 12000 interactions: {ratio:.2f}x (target <= 2x) -> "
                  f"{'ok' if ratio <= 2 else 'LOSS'}")  # fmt: skip
            gain = rows[SHOP_GRAPH, 64].throughput * 64 / rows[SHOP_GRAPH, 1].throughput
            print(f"users/s at 64 users per call against 1 per call, {SHOP_GRAPH}: {gain:.1f}x")
        finally:
            stop(process)


if __name__ == "__main__":
    main()
