"""Graphs as first-class citizens, through the gateway: stored graphs queried by neighbourhood,
graph updates and the cache, link prediction and graph classification (real default models)."""

import concurrent.futures
import time

import grpc
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from services.gnn.datasets import motif_graphs
from services.gnn.defaults import SBM_GRAPH, lesmis_split, sbm_graph
from shared.tensors import from_numpy, to_numpy

NO_STORE = (("cache-control", "no-store"),)


@pytest.fixture(scope="module")
def gnn(gateway_channel):
    return gnn_pb2_grpc.GnnServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def sbm():
    return sbm_graph()


def probabilities(reply):
    return to_numpy(reply.outputs["probabilities"], "probabilities")


def query(gnn, metadata=(), **fields):
    reply, call = gnn.Predict.with_call(
        gnn_pb2.PredictRequest(model_name="sbm-sage", stored_graph=SBM_GRAPH, **fields), timeout=60, metadata=metadata
    )
    return reply, dict(call.trailing_metadata())["maas-cache"]


def test_a_query_whose_fan_out_covers_the_neighbourhood_agrees_with_a_full_graph_pass(gnn, sbm):
    full, _ = query(gnn, graph_version=1)
    assert full.nodes_used == len(sbm.labels) and full.graph_version == 1
    whole = probabilities(full)
    assert (whole.argmax(1) == sbm.labels).mean() > 0.95
    nodes = [0, 17, 4242, 99_999, 17]
    sampled, _ = query(gnn, graph_version=1, node_ids=nodes, fan_outs=[-1, -1])
    assert list(sampled.node_ids) == nodes
    assert 0 < sampled.nodes_used < len(sbm.labels) and sampled.edges_used > 0
    np.testing.assert_allclose(probabilities(sampled), whole[nodes], rtol=1e-4, atol=1e-5)


def test_a_sampled_query_costs_its_neighbourhood_and_labels_nodes_well(gnn, sbm):
    nodes = list(range(0, 100_000, 997))
    reply, _ = query(gnn, graph_version=1, node_ids=nodes, fan_outs=[10, 10])
    assert reply.nodes_used <= len(nodes) * (1 + 10 + 100)
    assert reply.edges_used <= len(nodes) * (10 + 100)
    labels = to_numpy(reply.outputs["label"], "label")
    assert (labels == sbm.labels[nodes]).mean() > 0.9


def new_block_nodes(sbm, block, count, rng):
    """Features of `count` new nodes of `block`, and edges to 6 existing nodes of that block each."""
    members = np.flatnonzero(sbm.labels == block)
    features = sbm.node_features[rng.choice(members, count)] + rng.normal(scale=0.1, size=(count, 16))
    first = len(sbm.labels)
    sources = np.repeat(np.arange(first, first + count), 6)
    targets = rng.choice(members, count * 6)
    return features.astype(np.float32), np.stack([sources, targets]).astype(np.int64), targets


def test_an_update_makes_a_new_version_whose_new_nodes_are_classified_at_once_and_caches_stay_true(
    gnn, sbm, gateway_channel
):
    rng = np.random.default_rng(7)
    features, edges, touched = new_block_nodes(sbm, 2, 20, rng)
    watched = [int(touched[0])]
    # Before: the latest version answers, and its result is cached under v1 for calls that name v1.
    before, outcome = query(gnn, node_ids=watched, fan_outs=[-1, -1])
    assert before.graph_version == 1 and outcome != "hit"
    _, outcome = query(gnn, node_ids=watched, fan_outs=[-1, -1], graph_version=1)
    assert outcome == "hit"

    update = gnn_pb2.UpdateGraphRequest(
        graph_name=SBM_GRAPH, base_version=1, node_features=from_numpy(features), edge_index=from_numpy(edges)
    )
    updated = gnn.UpdateGraph(update, timeout=60)
    assert updated.graph_version == 2 and updated.first_new_node_id == len(sbm.labels)
    assert updated.num_nodes == len(sbm.labels) + 20

    # The new nodes are classified at once by the inductive model.
    new_ids = list(range(updated.first_new_node_id, updated.num_nodes))
    reply, _ = query(gnn, graph_version=2, node_ids=new_ids)
    assert (to_numpy(reply.outputs["label"], "label") == 2).mean() >= 0.9

    # The latest version now is v2: the cached v1 answer is not served for it.
    after, outcome = query(gnn, node_ids=watched, fan_outs=[-1, -1])
    assert after.graph_version == 2 and outcome != "hit"
    assert after.nodes_used > before.nodes_used
    assert not np.allclose(probabilities(after), probabilities(before))
    # v1 still answers as before; v2's answer is cached under v2.
    old, _ = query(gnn, node_ids=watched, fan_outs=[-1, -1], graph_version=1, metadata=NO_STORE)
    np.testing.assert_allclose(probabilities(old), probabilities(before), rtol=1e-5, atol=1e-6)
    again, outcome = query(gnn, node_ids=watched, fan_outs=[-1, -1], graph_version=2)
    assert outcome == "hit" and again == after

    # A second update from the stale base is refused: updates never drop one another.
    with pytest.raises(grpc.RpcError) as err:
        gnn.UpdateGraph(update, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "base_version" in err.value.details()


def test_link_prediction_scores_held_out_edges_well_and_suggests_new_neighbours(gnn):
    train, test = lesmis_split(0)
    pairs = test.edge_label_index.numpy().astype(np.int64)
    reply = gnn.PredictLinks(
        gnn_pb2.PredictLinksRequest(model_name="lesmis-links", stored_graph="les-miserables", pairs=from_numpy(pairs)),
        timeout=30,
    )
    scores = to_numpy(reply.outputs["scores"], "scores")
    assert scores.shape == (pairs.shape[1],) and reply.graph_version == 1
    assert roc_auc_score(test.edge_label.numpy(), scores) >= 0.85

    top = gnn.PredictLinks(
        gnn_pb2.PredictLinksRequest(model_name="lesmis-links", stored_graph="les-miserables", node_ids=[11, 48],
                                    top_k=5),
        timeout=30,
    )  # fmt: skip
    neighbours = to_numpy(top.outputs["neighbors"], "neighbors")
    assert neighbours.shape == (2, 5)
    linked = {(int(u), int(v)) for u, v in train.edge_index.t().tolist()}
    for row, node in enumerate((11, 48)):
        assert node not in neighbours[row]
        assert not any((int(v), node) in linked for v in neighbours[row])
    assert np.all(np.diff(to_numpy(top.outputs["neighbor_scores"], "neighbor_scores"), axis=1) <= 0)


def as_graphs(graphs):
    return [gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(e)) for x, e, _ in graphs]


def test_graph_classification_labels_held_out_motif_graphs(gnn):
    graphs = motif_graphs(100, seed=123)
    reply = gnn.ClassifyGraphs(gnn_pb2.ClassifyGraphsRequest(model_name="motif-gin", graphs=as_graphs(graphs)),
                               timeout=30)  # fmt: skip
    labels = to_numpy(reply.outputs["label"], "label")
    assert labels.shape == (100,)
    assert (labels == np.array([y for _, _, y in graphs])).mean() >= 0.9


def test_concurrent_graph_classifications_batched_equal_one_by_one(gnn):
    graphs = as_graphs(motif_graphs(48, seed=5))

    def classify(graph):
        request = gnn_pb2.ClassifyGraphsRequest(model_name="motif-gin", graphs=[graph])
        return probabilities(gnn.ClassifyGraphs(request, timeout=30, metadata=NO_STORE))

    alone = [classify(graph) for graph in graphs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(classify, graphs))
    for single, batched in zip(alone, together, strict=True):
        np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def sbm_query(**fields):
    return "Predict", gnn_pb2.PredictRequest(model_name="sbm-sage", stored_graph=SBM_GRAPH, graph_version=1, **fields)


def tensor(array, dtype):
    return from_numpy(np.asarray(array, dtype))


BAD_INPUT = {
    "node id out of range": (*sbm_query(node_ids=[5, 100_000]), ["node_ids[1]", "100000", "0..99999"]),
    "negative node id": (*sbm_query(node_ids=[-1]), ["node_ids[0]", "-1"]),
    "k over the limit": (*sbm_query(node_ids=[1], fan_outs=[2] * 5), ["fan_outs", "5 hops", "at most 4"]),
    "fan-out of 0": (*sbm_query(node_ids=[1], fan_outs=[10, 0]), ["fan_outs[1]", "0", "-1 for all"]),
    "fan-out over the limit": (*sbm_query(node_ids=[1], fan_outs=[5000]), ["fan_outs[0]", "5000"]),
    "update edge to a missing node": (
        "UpdateGraph",
        gnn_pb2.UpdateGraphRequest(graph_name=SBM_GRAPH, node_features=tensor(np.zeros((1, 16)), np.float32),
                                   edge_index=tensor([[0], [10**9]], np.int64)),
        ["edge_index", "node 1000000000 does not exist", "plus 1 new"],
    ),
    "update feature width mismatch": (
        "UpdateGraph",
        gnn_pb2.UpdateGraphRequest(graph_name=SBM_GRAPH, node_features=tensor(np.zeros((2, 3)), np.float32)),
        ["node_features", "[M, 16]", "[2, 3]"],
    ),
    "graph feature width mismatch": (
        "ClassifyGraphs",
        gnn_pb2.ClassifyGraphsRequest(model_name="motif-gin", graphs=[
            gnn_pb2.Graph(node_features=tensor(np.ones((3, 10)), np.float32), edge_index=tensor([[0], [1]], np.int64)),
            gnn_pb2.Graph(node_features=tensor(np.ones((3, 4)), np.float32), edge_index=tensor([[0], [1]], np.int64)),
        ]),
        ["graphs[1].node_features", "[N, 10]", "[3, 4]"],
    ),
    "graph over the size limit": (
        "ClassifyGraphs",
        gnn_pb2.ClassifyGraphsRequest(model_name="motif-gin", graphs=[gnn_pb2.Graph(
            node_features=tensor(np.zeros((100_001, 10)), np.float32), edge_index=tensor(np.zeros((2, 0)), np.int64))]),
        ["graphs[0].node_features", "100001 nodes", "at most 100000"],
    ),
    "top_k over the limit": (
        "PredictLinks",
        gnn_pb2.PredictLinksRequest(model_name="lesmis-links", stored_graph="les-miserables", node_ids=[1], top_k=500),
        ["top_k", "500"],
    ),
    "pair out of range": (
        "PredictLinks",
        gnn_pb2.PredictLinksRequest(model_name="lesmis-links", stored_graph="les-miserables",
                                    pairs=tensor([[0, 1], [2, 77]], np.int64)),
        ["pairs[3]", "77"],
    ),
    "wrong task for the model": (
        "ClassifyGraphs",
        gnn_pb2.ClassifyGraphsRequest(model_name="sbm-sage", graphs=[gnn_pb2.Graph(
            node_features=tensor(np.ones((2, 16)), np.float32), edge_index=tensor([[0], [1]], np.int64))]),
        ["model_name", "node-level", "Predict"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_graph_input_gets_invalid_argument_naming_the_field(gnn, case):
    method, request, fragments = BAD_INPUT[case]
    with pytest.raises(grpc.RpcError) as err:
        getattr(gnn, method)(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details()


def test_the_gnn_service_keeps_serving_after_bad_graph_input(gnn, sbm):
    for method, request, _ in BAD_INPUT.values():
        with pytest.raises(grpc.RpcError):
            getattr(gnn, method)(request, timeout=30)
    reply, _ = query(gnn, graph_version=1, node_ids=[3])
    assert to_numpy(reply.outputs["label"], "label")[0] == sbm.labels[3]


def test_a_deleted_graph_version_answers_not_found_naming_the_versions_left(gnn, sbm, cluster):
    from services.gnn.graph_store import GraphStore
    from shared.model_store import ModelStore

    # A small graph of SBM nodes of its own, written into the cluster's (sealed) store as `make models` would.
    members = np.arange(40)
    edges = np.stack([members, (members + 1) % 40]).astype(np.int64)
    GraphStore(ModelStore(cluster.var_dir / "models")).publish_edges(
        "churn", edges, sbm.node_features[members], undirected=True
    )

    def ask(version, metadata=NO_STORE):
        request = gnn_pb2.PredictRequest(model_name="sbm-sage", stored_graph="churn", graph_version=version,
                                         node_ids=[3])  # fmt: skip
        return gnn.Predict(request, timeout=30, metadata=metadata)

    def cached(version):
        """The cache outcome of a query naming `version`, or the error the gateway answers."""
        request = gnn_pb2.PredictRequest(model_name="sbm-sage", stored_graph="churn", graph_version=version,
                                         node_ids=[3])  # fmt: skip
        try:
            return dict(gnn.Predict.with_call(request, timeout=30)[1].trailing_metadata())["maas-cache"]
        except grpc.RpcError as exc:
            return exc

    assert ask(1).graph_version == 1
    assert [cached(1), cached(1)] == ["miss", "hit"]  # v1's answer is in the gateway's cache
    # Bigger than a tenth of the graph: stored as a full version, which v1 is no base of.
    added = np.stack([np.arange(40, 50), np.arange(10)])
    update = gnn_pb2.UpdateGraphRequest(graph_name="churn", base_version=1, edge_index=from_numpy(added),
                                        node_features=from_numpy(sbm.node_features[40:50]))  # fmt: skip
    assert gnn.UpdateGraph(update, timeout=60).graph_version == 2

    with pytest.raises(grpc.RpcError) as err:
        gnn.DeleteGraphVersion(gnn_pb2.DeleteGraphVersionRequest(graph_name="churn", graph_version=2), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "latest" in err.value.details()
    left = gnn.DeleteGraphVersion(gnn_pb2.DeleteGraphVersionRequest(graph_name="churn", graph_version=1), timeout=30)
    assert list(left.graph_versions) == [2]

    with pytest.raises(grpc.RpcError) as err:
        ask(1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "graph 'churn' has no version 1; it has [2]" in err.value.details()
    assert ask(2).graph_version == 2 and ask(0, ()).graph_version == 2  # the service keeps serving the graph
    # The deleted version's answer, still in the cache, is not served: the gateway refuses the version first.
    refused = cached(1)
    assert refused.code() == grpc.StatusCode.NOT_FOUND and refused.details() == err.value.details()

    # Deleted past this gateway (straight at the gnn service, as another gateway would): the service's event
    # tells the gateway, which refuses the version from then on, though its answer is cached.
    added = np.stack([np.arange(50, 70), np.arange(20)])
    update = gnn_pb2.UpdateGraphRequest(graph_name="churn", base_version=2, edge_index=from_numpy(added),
                                        node_features=from_numpy(sbm.node_features[50:70]))  # fmt: skip
    assert gnn.UpdateGraph(update, timeout=60).graph_version == 3
    cached(2)  # (the latest-version query above may have stored v2's answer already)
    assert cached(2) == "hit"
    with grpc.insecure_channel(cluster.specs["gnn"].target) as direct:
        request = gnn_pb2.DeleteGraphVersionRequest(graph_name="churn", graph_version=2)
        assert list(gnn_pb2_grpc.GnnServiceStub(direct).DeleteGraphVersion(request, timeout=30).graph_versions) == [3]
    deadline = time.monotonic() + 15
    while isinstance(outcome := cached(2), str):
        assert outcome == "hit" and time.monotonic() < deadline, "the gateway still serves the deleted version"
        time.sleep(0.1)
    assert outcome.code() == grpc.StatusCode.NOT_FOUND
    assert "graph 'churn' has no version 2; it has [3]" in outcome.details()
