"""The Python SDK against the suite's cluster, and its retry and deadline policy against small real servers."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

from maas.dense.v1 import dense_pb2_grpc
from maas.training.v1 import training_pb2_grpc
from maas_client import (
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    state_name,
)
from tests.clients.scenario import DIGIT_LABELS, DIGITS, EMBED_TEXTS, KARATE_NODES, SENTIMENT_TEXTS
from tests.clients.servers import DroppingTraining, FlakyDense

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def maas(cluster):
    with Client(cluster.specs["gateway"].target) as client:
        yield client


def test_dense_takes_numpy_and_gives_numpy(maas):
    pixels = np.array(DIGITS, np.float32)
    named = maas.dense.predict("digits-mlp", {"pixels": pixels})
    assert named.model == "digits-mlp" and named.version >= 1
    assert named["label"].tolist() == DIGIT_LABELS
    assert named["probabilities"].shape == (3, 10) and named["probabilities"].dtype == np.float32
    # A bare array goes to the model's only input; a version and an output can be chosen.
    bare = maas.dense.predict("digits-mlp", pixels, version=named.version, outputs=["label"])
    assert list(bare.outputs) == ["label"] and bare["label"].tolist() == DIGIT_LABELS


def test_gnn_on_a_stored_and_an_inline_graph(maas):
    stored = maas.gnn.predict("karate-gcn", stored_graph="karate", node_ids=KARATE_NODES)
    assert stored.node_ids.tolist() == KARATE_NODES and stored["label"].shape == (3,)
    # A small inline graph with the karate graph's 34-wide one-hot features.
    features = np.eye(4, 34, dtype=np.float32)
    edges = np.array([[0, 1, 2, 3], [1, 2, 3, 0]])
    inline = maas.gnn.predict("karate-gcn", node_features=features, edge_index=edges)
    assert inline.node_ids.tolist() == [0, 1, 2, 3] and inline["label"].shape == (4,)


def test_gnn_graph_tasks_through_the_sdk(maas):
    sampled = maas.gnn.predict("sbm-sage", stored_graph="sbm-100k", graph_version=1, node_ids=[4, 5], fan_outs=[5, 5])
    assert sampled.graph_version == 1 and 2 < sampled.nodes_used <= 2 * (1 + 5 + 25) and sampled["label"].shape == (2,)
    links = maas.gnn.links("lesmis-links", stored_graph="les-miserables", pairs=np.array([[0, 11], [11, 48]]),
                           node_ids=[11], top_k=3)  # fmt: skip
    assert links["scores"].shape == (2,) and links["neighbors"].shape == (1, 3)
    from services.gnn.datasets import motif_graphs

    graphs = motif_graphs(6, seed=4)
    labels = maas.gnn.classify("motif-gin", [(x, e) for x, e, _ in graphs])["label"]
    assert labels.tolist() == [y for *_, y in graphs]
    with pytest.raises(InvalidArgument, match="edge_index"):
        maas.gnn.update_graph("sbm-100k", edge_index=np.array([[0], [10**9]]))


def test_nlp_embed_and_classify(maas):
    vectors = maas.nlp.embed(EMBED_TEXTS)
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > 0.5
    result = maas.nlp.classify(SENTIMENT_TEXTS)
    assert result.labels == ["positive", "negative"]
    assert result["probabilities"].shape == (2, 2)


def test_errors_carry_the_status_and_the_servers_message(maas):
    with pytest.raises(InvalidArgument, match=r"shape must be \[-1, 64\]") as caught:
        maas.dense.predict("digits-mlp", np.zeros((1, 63), np.float32))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "Predict" in str(caught.value)
    with pytest.raises(NotFound):
        maas.dense.predict("no-such-model", {"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(NotFound):
        maas.training.get("job-does-not-exist")
    with pytest.raises(ValueError, match="dataset"):
        maas.training.submit("dense", "mlp")


def test_health_reports_the_gateway_and_each_family(maas):
    assert maas.health() == {"gateway": "SERVING", "dense": "SERVING", "gnn": "SERVING", "nlp": "SERVING"}


def test_upload_train_watch_and_version_life_cycle(maas, tmp_path):
    # A CSV data set: iris-like, four features and a label column.
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0, 0], [3, 3, 0, 0], [0, 3, 3, 3]], np.float32)
    labels = rng.integers(0, 3, 150)
    features = centres[labels] + rng.normal(0, 0.5, (150, 4))
    path = tmp_path / "blobs.csv"
    rows = [
        "f0,f1,f2,f3,label",
        *(",".join(f"{v:.4f}" for v in x) + f",{y}" for x, y in zip(features, labels, strict=True)),
    ]
    path.write_text("\n".join(rows) + "\n")
    progress = []
    dataset = maas.datasets.upload(path, "dense", progress=lambda sent, total: progress.append((sent, total)))
    assert dataset.size_bytes == path.stat().st_size  # stored as sent; the trainer parses it
    assert progress[-1] == (path.stat().st_size, path.stat().st_size)
    assert maas.datasets.get(dataset.dataset_id).sha256 == dataset.sha256
    listing = maas.datasets.list("dense")
    assert dataset.dataset_id in [d.dataset_id for d in listing.datasets]
    assert "iris" in [b.name for b in listing.builtin_datasets]
    with pytest.raises(NotFound):
        maas.datasets.get("ds-0000000000000000")

    def train(key: str):
        job = maas.training.submit(
            "dense", "mlp", dataset_id=dataset.dataset_id, epochs=4, output_model="sdk-blobs", idempotency_key=key
        )
        assert job.job_id and job.spec.output_model == "sdk-blobs"  # queued, or already claimed by a trainer
        events = []
        final = maas.training.wait(job.job_id, on_event=events.append)
        assert state_name(final.state) == "succeeded", final.error
        return final, events

    first, events = train("sdk-blobs-1")
    epochs = [event for event in events if event.epoch]
    assert [e.epoch for e in epochs][-1] == 4 and all("accuracy" in e.validation_metrics for e in epochs)
    assert first.metrics["accuracy"] > 0.8
    second, _ = train("sdk-blobs-2")
    assert second.model_version == first.model_version + 1
    # The same idempotency key gives the same job back.
    again = maas.training.submit("dense", "mlp", dataset_id=dataset.dataset_id, output_model="sdk-blobs",
                                 idempotency_key="sdk-blobs-1")  # fmt: skip
    assert again.job_id == first.job_id
    assert first.job_id in {job.job_id for job in maas.training.list("dense")}

    # Promote the first version, then roll back from the second.
    assert maas.models.promote("sdk-blobs", first.model_version).default_version == first.model_version
    assert maas.dense.predict("sdk-blobs", features[:5].astype(np.float32)).version == first.model_version
    maas.models.promote("sdk-blobs", second.model_version)
    assert maas.models.rollback("sdk-blobs").default_version == first.model_version
    with pytest.raises(FailedPrecondition, match="no version older"):
        maas.models.rollback("sdk-blobs")
    assert ("dense", "sdk-blobs") in {(family, model.name) for family, model in maas.models.list()}
    # A canary: the second version takes a share of the first's traffic until it is ended.
    model = maas.models.canary("sdk-blobs", second.model_version, 30)
    assert (model.default_version, model.canary.model_version, model.canary.percent) == (
        first.model_version, second.model_version, 30)  # fmt: skip
    assert not maas.models.canary("sdk-blobs", second.model_version, 0).HasField("canary")


def test_cancel_a_running_job(maas):
    job = maas.training.submit("dense", "mlp", dataset="digits", epochs=500, output_model="sdk-cancelled")
    cancelled = maas.training.cancel(job.job_id)
    final = maas.training.wait(cancelled.job_id)
    assert state_name(final.state) == "cancelled"
    with pytest.raises(FailedPrecondition):
        maas.training.cancel(job.job_id)


@pytest.fixture
def flaky_server():
    servers = []

    def start(servicer: FlakyDense) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        dense_pb2_grpc.add_DenseServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_unavailable_is_retried(flaky_server):
    servicer = FlakyDense(failures=2)
    with Client(flaky_server(servicer)) as client:
        assert client.dense.predict("m", {"x": np.zeros((1, 2), np.float32)}).version == 7
    assert servicer.attempts == 3


def test_retries_can_be_turned_off(flaky_server):
    servicer = FlakyDense(failures=1)
    with Client(flaky_server(servicer), max_attempts=1) as client, pytest.raises(Unavailable, match="warming up"):
        client.dense.predict("m", {"x": np.zeros((1, 2), np.float32)})
    assert servicer.attempts == 1


def test_every_call_has_a_deadline(flaky_server):
    servicer = FlakyDense(failures=0, delay_s=2.0)
    with Client(flaky_server(servicer), timeout=0.3) as client, pytest.raises(DeadlineExceeded):
        client.dense.predict("m", {"x": np.zeros((1, 2), np.float32)})
    # The server saw the client's default deadline (0.3 s, not gRPC's none), give or take clock reading.
    assert servicer.deadlines[0] is not None and servicer.deadlines[0] < 5


def test_a_watch_cut_by_unavailable_resumes_without_repeating_events():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = DroppingTraining()
    training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            events = list(client.training.watch("job-1"))
    finally:
        server.stop(None)
    assert servicer.watches == 2
    assert [e.epoch for e in events] == [0, 1, 2, 3]
    assert state_name(events[-1].state) == "succeeded"


def test_mutual_tls_needs_the_certificate_and_its_key():
    with pytest.raises(ValueError, match="both a client certificate and its private key"):
        Client("127.0.0.1:1", private_key=b"key")
    with pytest.raises(ValueError, match="positive number of seconds"):
        Client("127.0.0.1:1", timeout=0)
