"""Cache keys from a canonical encoding of a request's inputs, never from its protobuf bytes.

Protobuf bytes are not canonical (map order, field order, unknown fields), so each family
hashes what actually determines the answer: tensors as dtype + shape + raw bytes, texts as
length-prefixed UTF-8, in a fixed order, each part tagged and length-prefixed.
"""

from __future__ import annotations

import hashlib
import struct

from maas.common.v1 import tensor_pb2
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2

KEY_PREFIX = "maas:v1:result"


class CanonicalHasher:
    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def _part(self, tag: bytes, payload: bytes) -> None:
        self._digest.update(tag + struct.pack("<Q", len(payload)) + payload)

    def text(self, value: str) -> CanonicalHasher:
        self._part(b"s", value.encode("utf-8"))
        return self

    def integers(self, values) -> CanonicalHasher:
        values = list(values)
        self._part(b"i", struct.pack(f"<{len(values)}q", *values))
        return self

    def tensor(self, tensor: tensor_pb2.Tensor) -> CanonicalHasher:
        self.integers([tensor.dtype, len(tensor.shape), *tensor.shape])
        self._part(b"t", tensor.data)
        return self

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def dense_digest(request: dense_pb2.PredictRequest) -> str:
    hasher = CanonicalHasher().text("dense")
    for name in sorted(request.inputs):
        hasher.text(name).tensor(request.inputs[name])
    hasher.integers([len(request.output_names)])
    for name in request.output_names:
        hasher.text(name)
    return hasher.hexdigest()


def gnn_digest(request: gnn_pb2.PredictRequest) -> str:
    hasher = CanonicalHasher().text("gnn")
    if request.HasField("graph"):
        graph = request.graph
        hasher.text("graph").tensor(graph.node_features).tensor(graph.edge_index)
        hasher.integers([graph.HasField("edge_weight")])
        if graph.HasField("edge_weight"):
            hasher.tensor(graph.edge_weight)
    else:
        hasher.text("stored").text(request.stored_graph)
    hasher.integers(request.node_ids)
    return hasher.hexdigest()


def nlp_digest(request: nlp_pb2.PredictRequest) -> str:
    hasher = CanonicalHasher().text("nlp").integers([len(request.texts)])
    for text in request.texts:
        hasher.text(text)
    return hasher.hexdigest()


def result_key(family: str, model: str, version: int, digest: str) -> str:
    return f"{KEY_PREFIX}:{family}:{model}:{version}:{digest}"
