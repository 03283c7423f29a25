"""`python -m clients.example [TARGET]`: one call to each model family through the gateway.

This is the small client the README shows; it uses only the generated stubs and numpy. With
API keys on at the gateway, it sends `MAAS_API_KEY`; without one it says the calls were skipped.
"""

from __future__ import annotations

import os
import sys

import grpc
import numpy as np
from sklearn.datasets import load_digits

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from shared.tensors import from_numpy, to_numpy


def run_examples(target: str = "127.0.0.1:50051") -> None:
    key = os.environ.get("MAAS_API_KEY", "")
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    try:
        with grpc.insecure_channel(target) as channel:
            _calls(channel, metadata)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        why = "MAAS_API_KEY was refused" if key else "the gateway needs an API key; set MAAS_API_KEY to run them"
        print(f"example calls skipped: {why} ({exc.details()})")


def _calls(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
    # Dense: classify three 8x8 digit images (raw pixel values 0..16).
    digits = load_digits()
    pixels = digits.data[:3].astype(np.float32)
    reply, call = dense_pb2_grpc.DenseServiceStub(channel).Predict.with_call(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(pixels)}),
        timeout=10,
        metadata=metadata,
    )
    labels = to_numpy(reply.outputs["label"], "label")
    print(
        f"dense  digits-mlp v{reply.model_version}: true {digits.target[:3].tolist()} -> "
        f"predicted {labels.tolist()}  (cache: {dict(call.trailing_metadata()).get('maas-cache')})"
    )

    # GNN: label nodes of the karate-club graph stored with the model.
    reply = gnn_pb2_grpc.GnnServiceStub(channel).Predict(
        gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0, 16, 33]),
        timeout=10,
        metadata=metadata,
    )
    print(
        f"gnn    karate-gcn v{reply.model_version}: nodes {list(reply.node_ids)} -> communities "
        f"{to_numpy(reply.outputs['label'], 'label').tolist()}"
    )

    # NLP: embeddings, then sentiment.
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."]
    reply = nlp.Predict(nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=texts), timeout=10, metadata=metadata)
    embedding = to_numpy(reply.outputs["embedding"], "embedding")
    print(
        f"nlp    minilm-l6-v2 v{reply.model_version}: {embedding.shape[1]}-d embeddings; cosine "
        f"paraphrase {embedding[0] @ embedding[1]:.2f}, unrelated {embedding[0] @ embedding[2]:.2f}"
    )
    reply = nlp.Predict(
        nlp_pb2.PredictRequest(model_name="sentiment", texts=["I love this!", "This is awful."]),
        timeout=10,
        metadata=metadata,
    )
    print(f"nlp    sentiment v{reply.model_version}: {list(reply.labels)}")


if __name__ == "__main__":
    run_examples(*sys.argv[1:])
