"""Recommendation through the gateway: the default LightGCN recommender on its user-item graph, answers
that follow graph updates without retraining, the cache, content-based similar items, bad input, the Open
Inference Protocol, and a recommender trained through the training service."""

import grpc
import numpy as np
import pytest

from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from services.gnn.defaults import SHOP_GRAPH, SHOP_LIGHTGCN
from services.gnn.recommend import planted_interactions
from shared.tensors import from_numpy, to_numpy

USERS, ITEMS, COMMUNITIES = 600, 300, 6
NO_STORE = (("cache-control", "no-store"),)


@pytest.fixture(scope="module")
def gnn(gateway_channel):
    return gnn_pb2_grpc.GnnServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def data():
    return planted_interactions(seed=0)


def recommend(gnn, metadata=(), **fields):
    fields.setdefault("model_name", SHOP_LIGHTGCN)
    fields.setdefault("top_k", 10)
    reply, call = gnn.Recommend.with_call(gnn_pb2.RecommendRequest(**fields), timeout=60, metadata=metadata)
    return reply, dict(call.trailing_metadata())["maas-cache"]


def items_of(reply) -> np.ndarray:
    return to_numpy(reply.outputs["items"], "items")


def seen(data, user: int) -> set[int]:
    pairs = data.all_pairs()
    return {int(i) + USERS for i in pairs[1][pairs[0] == user]}


def community(item_node: int) -> int:
    return (item_node - USERS) % COMMUNITIES


def own_graph(gnn, name: str, **update) -> gnn_pb2.UpdateGraphResponse:
    """A private copy of the shop graph with `update` applied (UpdateGraph's new_graph_name): tests that change
    the graph change their own."""
    return gnn.UpdateGraph(gnn_pb2.UpdateGraphRequest(graph_name=SHOP_GRAPH, new_graph_name=name, **update),
                           timeout=60)  # fmt: skip


def user_row(width: int, count: int = 1) -> np.ndarray:
    return np.zeros((count, width), np.float32)  # column 0 is 0: a user


def test_the_default_recommender_beats_popularity_on_its_held_out_split(gateway_channel):
    models = models_pb2_grpc.ModelServiceStub(gateway_channel)
    model = models.GetModel(models_pb2.GetModelRequest(model_name=SHOP_LIGHTGCN), timeout=30).model
    metrics = dict(model.versions[-1].metrics)
    assert metrics["recall@10"] > 3 * metrics["popularity_recall@10"]
    assert metrics["ndcg@10"] > 3 * metrics["popularity_ndcg@10"]
    assert metrics["recall@10"] > 0.25


def test_recommendations_leave_out_seen_items_unless_asked_and_stay_in_the_users_community(gnn, data):
    users = list(range(0, USERS, 7))
    reply, _ = recommend(gnn, user_ids=users, top_k=10)
    ranked = items_of(reply)
    assert list(reply.user_ids) == users and ranked.shape == (len(users), 10)
    assert reply.graph_version >= 1 and reply.model_version >= 1
    assert not to_numpy(reply.outputs["popularity_fallback"], "popularity_fallback").any()
    scores = to_numpy(reply.outputs["scores"], "scores")
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    for row, user in enumerate(users):
        assert not set(ranked[row].tolist()) & seen(data, user)
        assert all(USERS <= item < USERS + ITEMS for item in ranked[row])
    # Users' own communities: the planted structure is what the model learned.
    owns = []
    for row, user in enumerate(users):
        home = np.bincount([community(i) for i in seen(data, user)], minlength=COMMUNITIES).argmax()
        owns.append(np.mean([community(int(i)) == home for i in ranked[row]]))
    assert np.mean(owns) > 0.7
    with_seen, _ = recommend(gnn, user_ids=users, top_k=10, include_seen=True)
    overlap = [len(set(items_of(with_seen)[row].tolist()) & seen(data, user)) for row, user in enumerate(users)]
    assert sum(overlap) > 0


def test_many_users_per_call_get_what_each_gets_alone(gnn):
    users = list(range(100, 164))
    together = items_of(recommend(gnn, NO_STORE, user_ids=users, top_k=5)[0])
    for row, user in enumerate(users[:8]):
        alone = items_of(recommend(gnn, NO_STORE, user_ids=[user], top_k=5)[0])
        np.testing.assert_array_equal(alone[0], together[row])


def test_a_new_interaction_changes_the_next_answer_and_is_never_recommended_back(gnn, data):
    user = 3
    before, _ = recommend(gnn, user_ids=[user], top_k=10)
    top = int(items_of(before)[0][0])
    graph = own_graph(gnn, "shop-one-more", edge_index=from_numpy(np.array([[user], [top]], np.int64)))
    after, _ = recommend(gnn, stored_graph="shop-one-more", user_ids=[user], top_k=10)
    assert after.graph_version == graph.graph_version
    assert top not in items_of(after)[0].tolist()
    assert items_of(after)[0].tolist() != items_of(before)[0].tolist()


def test_a_new_user_is_served_from_its_interactions_at_once_and_a_cold_one_by_popularity(gnn, data):
    jazz = [USERS + i for i in range(0, ITEMS, COMMUNITIES)][:8]  # community 0's items
    features = user_row(1 + 384, 2)  # (item flag, MiniLM content): a fan of community 0, and a user with none yet
    first = 900
    edges = np.array([[first] * len(jazz), jazz], np.int64)
    graph = own_graph(gnn, "shop-new-users", node_features=from_numpy(features), edge_index=from_numpy(edges))
    assert graph.first_new_node_id == first
    reply, _ = recommend(gnn, stored_graph="shop-new-users", user_ids=[first, first + 1], top_k=10)
    fallback = to_numpy(reply.outputs["popularity_fallback"], "popularity_fallback")
    assert fallback.tolist() == [False, True]
    fan, cold = items_of(reply)
    assert not set(fan.tolist()) & set(jazz)
    assert np.mean([community(int(i)) == 0 for i in fan]) > 0.7
    counts = np.bincount(data.all_pairs()[1], minlength=ITEMS)
    assert set(cold.tolist()) == set((np.argsort(-counts, kind="stable")[:10] + USERS).tolist())


def test_latest_graph_answers_are_never_read_from_the_cache_and_named_versions_are(gnn):
    _, outcome = recommend(gnn, user_ids=[5], top_k=3)
    _, again = recommend(gnn, user_ids=[5], top_k=3)
    assert outcome != "hit" and again != "hit"
    pinned, _ = recommend(gnn, user_ids=[5], top_k=3, graph_version=1)
    repeat, outcome = recommend(gnn, user_ids=[5], top_k=3, graph_version=1)
    assert outcome == "hit" and items_of(repeat).tolist() == items_of(pinned).tolist()

    # After an update the latest answer is the new version's, never a cached answer of the old one.
    first, _ = recommend(gnn, stored_graph=SHOP_GRAPH, user_ids=[6], top_k=5)
    top = int(items_of(first)[0][0])
    update = gnn_pb2.UpdateGraphRequest(graph_name=SHOP_GRAPH, edge_index=from_numpy(np.array([[6], [top]], np.int64)))
    try:
        updated = gnn.UpdateGraph(update, timeout=60)
        after, outcome = recommend(gnn, stored_graph=SHOP_GRAPH, user_ids=[6], top_k=5)
        assert outcome != "hit" and after.graph_version == updated.graph_version
        assert top not in items_of(after)[0].tolist()
    finally:
        pass  # later versions of the shop graph keep every earlier interaction: other tests read theirs


def test_similar_items_by_content_share_their_community(gnn):
    items = [USERS + i for i in range(0, 60, 5)]
    reply = gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name=SHOP_LIGHTGCN, item_ids=items, top_k=5),
                             timeout=60)  # fmt: skip
    assert reply.by == "content" and list(reply.item_ids) == items
    similar = to_numpy(reply.outputs["items"], "items")
    scores = to_numpy(reply.outputs["scores"], "scores")
    assert similar.shape == (len(items), 5) and (scores <= 1.0 + 1e-5).all()
    for row, item in enumerate(items):
        assert item not in similar[row]
    same = np.mean([community(int(s)) == community(item) for row, item in enumerate(items) for s in similar[row]])
    assert same > 0.8
    collaborative = gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name=SHOP_LIGHTGCN, item_ids=items, top_k=5,
                                                                 by="collaborative"), timeout=60)  # fmt: skip
    assert collaborative.by == "collaborative"
    ranked = to_numpy(collaborative.outputs["items"], "items")
    assert np.mean([community(int(s)) == community(item) for row, item in enumerate(items) for s in ranked[row]]) > 0.6


BAD = {
    "unknown user": ({"user_ids": [5, 10**6]}, ["user_ids[1]", "out of range"]),
    "an item as a user": ({"user_ids": [USERS + 1]}, ["user_ids[0]", "an item, not a user"]),
    "negative user": ({"user_ids": [-1]}, ["user_ids[0]", "-1"]),
    "k of zero": ({"user_ids": [1], "top_k": 0}, ["top_k", "expected 1..100"]),
    "negative k": ({"user_ids": [1], "top_k": -3}, ["top_k", "-3"]),
    "k too large": ({"user_ids": [1], "top_k": 101}, ["top_k", "101", "1..100"]),
    "no users": ({"user_ids": []}, ["user_ids", "empty"]),
    "too many users": ({"user_ids": list(range(1025))}, ["user_ids", "1025", "at most 1024"]),
    "not a recommender": ({"model_name": "karate-gcn", "user_ids": [1]}, ["model_name", "call Predict"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_invalid_argument_naming_the_field_and_the_service_keeps_serving(gnn, case):
    fields, words = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        recommend(gnn, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    for word in words:
        assert word in err.value.details()
    assert items_of(recommend(gnn, user_ids=[1], top_k=2)[0]).shape == (1, 2)


def test_unknown_graphs_and_versions_are_not_found(gnn):
    for fields in ({"stored_graph": "no-such-graph"}, {"graph_version": 999}):
        with pytest.raises(grpc.RpcError) as err:
            recommend(gnn, user_ids=[1], **fields)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        recommend(gnn, user_ids=[1], stored_graph="sbm-100k")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a user-item graph" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name=SHOP_LIGHTGCN, item_ids=[3], top_k=5), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_ids[0]" in err.value.details()


# ---- Recommenders trained through the training service


def submit_and_wait(training, **fields):
    from maas.training.v1 import training_pb2 as t

    job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_GNN, **fields), timeout=10).job
    from tests.e2e.test_training import watch

    events = watch(training, job.job_id, timeout=300)
    assert events[-1].state == t.JOB_STATE_SUCCEEDED, events[-1]
    assert any(event.epoch for event in events)  # progress, epoch by epoch
    return training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job


@pytest.fixture(scope="module")
def training(gateway_channel):
    from maas.training.v1 import training_pb2_grpc

    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


def served(call, timeout=60):
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            waiting = exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
            if not waiting or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_a_lightgcn_job_on_the_built_in_interactions_beats_popularity_and_is_served(training, gnn):
    from maas.training.v1 import training_pb2 as t

    done = submit_and_wait(training, architecture="lightgcn", hidden_sizes=[32, 32], learning_rate=0.02, epochs=40,
                           batch_size=4096, builtin_dataset="interactions", output_model="e2e-shop",
                           gate=t.PromotionGate(metric="recall@10", min_value=0.1))  # fmt: skip
    assert done.metrics["recall@10"] > 2 * done.metrics["popularity_recall@10"]
    assert done.metrics["ndcg@10"] > 2 * done.metrics["popularity_ndcg@10"]
    reply = served(lambda: gnn.Recommend(gnn_pb2.RecommendRequest(model_name="e2e-shop", user_ids=[1, 2], top_k=5),
                                         timeout=30))  # fmt: skip
    assert reply.model_version == done.model_version and items_of(reply).shape == (2, 5)
    # Its user-item graph is in the graph store, named after the model; the built-in set's items have texts,
    # which the trainer embedded with the nlp service: SimilarItems ranks by those content vectors.
    again = gnn.Recommend(gnn_pb2.RecommendRequest(model_name="e2e-shop", stored_graph="e2e-shop-interactions",
                                                   user_ids=[1, 2], top_k=5), timeout=30)  # fmt: skip
    assert items_of(again).tolist() == items_of(reply).tolist()
    similar = gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name="e2e-shop", item_ids=[USERS], top_k=3),
                               timeout=30)  # fmt: skip
    assert similar.by == "content"
    default = gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name=SHOP_LIGHTGCN, item_ids=[USERS], top_k=3),
                               timeout=30)  # fmt: skip
    np.testing.assert_allclose(to_numpy(similar.outputs["scores"], "scores"),
                               to_numpy(default.outputs["scores"], "scores"), rtol=1e-4)  # the same MiniLM vectors


def test_an_uploaded_interaction_set_with_content_vectors_trains_a_recommender(training, gnn):
    import io

    from maas.training.v1 import training_pb2 as t

    small = planted_interactions(num_users=120, num_items=60, per_user=10, seed=3)
    pairs = small.all_pairs()
    content = np.eye(COMMUNITIES, dtype=np.float32)[np.arange(60) % COMMUNITIES]  # each item's community, one-hot
    buffer = io.BytesIO()
    np.savez(buffer, user_ids=pairs[0], item_ids=pairs[1], item_features=content)

    def messages():
        yield t.UploadDatasetRequest(info=t.DatasetInfo(name="clicks", family=t.FAMILY_GNN,
                                                        format=t.DATASET_FORMAT_NPZ))  # fmt: skip
        yield t.UploadDatasetRequest(chunk=buffer.getvalue())

    dataset = training.UploadDataset(messages(), timeout=60).dataset
    done = submit_and_wait(training, architecture="lightgcn", hidden_sizes=[16, 16], learning_rate=0.05, epochs=20,
                           batch_size=2048, dataset_id=dataset.dataset_id, output_model="e2e-clicks")  # fmt: skip
    assert done.metrics["recall@10"] > 0
    similar = served(lambda: gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name="e2e-clicks", item_ids=[120],
                                                                          top_k=5), timeout=30))  # fmt: skip
    assert similar.by == "content"
    assert all((int(i) - 120) % COMMUNITIES == 0 for i in to_numpy(similar.outputs["items"], "items")[0])


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"architecture": "lightgcn", "builtin_dataset": "karate"}, "lightgcn trains recommenders"),
        ({"architecture": "gcn", "builtin_dataset": "interactions"}, "train a recommender with architecture lightgcn"),
        ({"architecture": "lightgcn", "builtin_dataset": "interactions", "gate": {"metric": "accuracy"}},
         "not a ranking metric"),
    ],
)
def test_recommender_jobs_that_cannot_work_are_refused_at_submit(training, fields, fragment):
    from maas.training.v1 import training_pb2 as t

    gate = fields.pop("gate", None)
    request = t.SubmitJobRequest(family=t.FAMILY_GNN, output_model="e2e-refused", **fields)
    if gate:
        request.gate.CopyFrom(t.PromotionGate(**gate))
    with pytest.raises(grpc.RpcError) as err:
        training.SubmitJob(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()


# ---- The Open Inference Protocol, over gRPC and REST


def test_recommend_and_similar_items_through_open_inference_grpc_and_rest(cluster, gnn):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    native = gnn.Recommend(gnn_pb2.RecommendRequest(model_name=SHOP_LIGHTGCN, user_ids=[4, 8], top_k=5),
                           timeout=30)  # fmt: skip
    similar = gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name=SHOP_LIGHTGCN, item_ids=[USERS + 2], top_k=4),
                               timeout=30)  # fmt: skip
    http = f"127.0.0.1:{cluster.ports.gateway_http}"
    for module, target in ((triton_grpc, cluster.specs["gateway"].target), (triton_http, http)):
        with module.InferenceServerClient(target) as client:
            metadata = client.get_model_metadata(SHOP_LIGHTGCN)
            if module is triton_http:
                inputs = {i["name"] for i in metadata["inputs"]}
            else:
                inputs = {i.name for i in metadata.inputs}
            assert {"user_ids", "top_k", "include_seen"} <= inputs

            def tensor(name, value, datatype, module=module):
                result = module.InferInput(name, list(value.shape), datatype)
                result.set_data_from_numpy(value)
                return result

            users = tensor("user_ids", np.array([4, 8], np.int64), "INT64")
            answer = client.infer(SHOP_LIGHTGCN, [users, tensor("top_k", np.array([5], np.int64), "INT64")])
            assert answer.as_numpy("items").tolist() == items_of(native).tolist()
            np.testing.assert_allclose(answer.as_numpy("scores"), to_numpy(native.outputs["scores"], "scores"),
                                       rtol=1e-6)  # fmt: skip
            assert answer.as_numpy("popularity_fallback").tolist() == [False, False]
            seen_too = client.infer(SHOP_LIGHTGCN, [users, tensor("top_k", np.array([5], np.int64), "INT64"),
                                                    tensor("include_seen", np.array([True]), "BOOL")])  # fmt: skip
            assert seen_too.as_numpy("items").tolist() != items_of(native).tolist()

            items = tensor("item_ids", np.array([USERS + 2], np.int64), "INT64")
            answer = client.infer(SHOP_LIGHTGCN, [items, tensor("top_k", np.array([4], np.int64), "INT64")])
            assert answer.as_numpy("items").tolist() == to_numpy(similar.outputs["items"], "items").tolist()

            with pytest.raises(Exception) as err:  # noqa: PT011 - each client raises its own InferenceServerException
                client.infer(SHOP_LIGHTGCN, [users, tensor("top_k", np.array([0], np.int64), "INT64")])
            assert "top_k" in str(err.value)


def test_items_uploaded_with_texts_get_nlp_embeddings_at_training_time(training, gnn):
    import json

    from maas.training.v1 import training_pb2 as t

    small = planted_interactions(num_users=90, num_items=30, per_user=8, seed=4)
    pairs = small.all_pairs()
    body = json.dumps({"user_ids": pairs[0].tolist(), "item_ids": pairs[1].tolist(),
                       "item_texts": small.item_texts}).encode()  # fmt: skip

    def messages():
        yield t.UploadDatasetRequest(info=t.DatasetInfo(name="titles", family=t.FAMILY_GNN,
                                                        format=t.DATASET_FORMAT_JSON))  # fmt: skip
        yield t.UploadDatasetRequest(chunk=body)

    dataset = training.UploadDataset(messages(), timeout=60).dataset
    submit_and_wait(training, architecture="lightgcn", hidden_sizes=[8, 8], learning_rate=0.05, epochs=5,
                    batch_size=1024, dataset_id=dataset.dataset_id, output_model="e2e-titles")  # fmt: skip
    similar = served(lambda: gnn.SimilarItems(gnn_pb2.SimilarItemsRequest(model_name="e2e-titles", item_ids=[90],
                                                                          top_k=3), timeout=30))  # fmt: skip
    assert similar.by == "content"
    # Item 0's text has community 0's words: its nearest texts are community 0's items (every 6th).
    assert all((int(i) - 90) % COMMUNITIES == 0 for i in to_numpy(similar.outputs["items"], "items")[0])
