"""AsyncClient, the SDK over grpc.aio: the same calls as Client, awaited, against the suite's cluster."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import numpy as np
import pytest

from maas.dense.v1 import dense_pb2_grpc
from maas.training.v1 import training_pb2_grpc
from maas_client import AsyncClient, InvalidArgument, NotFound, state_name
from tests.clients.scenario import DIGIT_LABELS, DIGITS, EMBED_TEXTS, KARATE_NODES, SENTIMENT_TEXTS
from tests.clients.servers import DroppingTraining, FlakyDense

pytestmark = pytest.mark.slow


async def test_concurrent_calls_to_every_family(cluster, karate_labels):
    async with AsyncClient(cluster.specs["gateway"].target) as maas:
        pixels = np.array(DIGITS, np.float32)
        dense = await asyncio.gather(*(maas.dense.predict("digits-mlp", pixels) for _ in range(16)))
        assert all(result["label"].tolist() == DIGIT_LABELS for result in dense)
        graph, vectors, sentiment = await asyncio.gather(
            maas.gnn.predict("karate-gcn", stored_graph="karate", node_ids=KARATE_NODES),
            maas.nlp.embed(EMBED_TEXTS),
            maas.nlp.classify(SENTIMENT_TEXTS),
        )
        assert graph["label"].tolist() == karate_labels
        assert vectors.shape == (2, 384) and vectors[0] @ vectors[1] > 0.5
        assert sentiment.labels == ["positive", "negative"]
        assert ("dense", "digits-mlp") in {(family, model.name) for family, model in await maas.models.list()}
        with pytest.raises(InvalidArgument, match=r"shape must be \[-1, 64\]"):
            await maas.dense.predict("digits-mlp", np.zeros((1, 63), np.float32))
        with pytest.raises(NotFound):
            await maas.training.get("job-does-not-exist")


async def test_upload_train_and_watch(cluster, tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "".join(f'{{"text": "good {i}", "label": "p"}}\n{{"text": "bad {i}", "label": "n"}}\n' for i in range(8))
    )
    async with AsyncClient(cluster.specs["gateway"].target) as maas:
        dataset = await maas.datasets.upload(path, "nlp")
        assert dataset.size_bytes == path.stat().st_size
        job = await maas.training.submit(
            "nlp", "linear", dataset_id=dataset.dataset_id, epochs=2, output_model="aio-nlp"
        )
        events = [event async for event in maas.training.watch(job.job_id)]
        assert state_name(events[-1].state) == "succeeded"
        assert any(event.epoch == 2 for event in events)
        final = await maas.training.wait(job.job_id)  # a finished job: its history, then its record
        assert final.model_version >= 1 and "accuracy" in final.metrics


def serve(add, servicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


async def test_unavailable_is_retried_and_a_cut_watch_resumes():
    flaky, dropping = FlakyDense(failures=2), DroppingTraining()
    dense_server, dense_target = serve(dense_pb2_grpc.add_DenseServiceServicer_to_server, flaky)
    training_server, training_target = serve(training_pb2_grpc.add_TrainingServiceServicer_to_server, dropping)
    try:
        async with AsyncClient(dense_target) as client:
            assert (await client.dense.predict("m", {"x": np.zeros((1, 2), np.float32)})).version == 7
        async with AsyncClient(training_target) as client:
            events = [event async for event in client.training.watch("job-1")]
    finally:
        dense_server.stop(None)
        training_server.stop(None)
    assert flaky.attempts == 3
    assert dropping.watches == 2 and [e.epoch for e in events] == [0, 1, 2, 3]
