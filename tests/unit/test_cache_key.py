import numpy as np

from gateway.cache_key import dense_digest, gnn_digest, nlp_digest, result_key
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2
from shared.tensors import from_numpy


def dense_request(**inputs):
    return dense_pb2.PredictRequest(model_name="m", inputs={k: from_numpy(v) for k, v in inputs.items()})


def test_map_order_does_not_change_the_key():
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 1), np.int64)
    first = dense_pb2.PredictRequest(model_name="m")
    first.inputs["a"].CopyFrom(from_numpy(a))
    first.inputs["b"].CopyFrom(from_numpy(b))
    second = dense_pb2.PredictRequest(model_name="m")
    second.inputs["b"].CopyFrom(from_numpy(b))
    second.inputs["a"].CopyFrom(from_numpy(a))
    assert dense_digest(first) == dense_digest(second)


def test_same_bytes_with_another_shape_or_dtype_is_another_key():
    data = np.arange(6, dtype=np.float32)
    base = dense_digest(dense_request(x=data.reshape(2, 3)))
    assert base != dense_digest(dense_request(x=data.reshape(3, 2)))
    assert base != dense_digest(dense_request(x=data.view(np.int32).reshape(2, 3)))


def test_changed_value_is_another_key():
    x = np.zeros((1, 4), np.float32)
    y = x.copy()
    y[0, 3] = 1e-7
    assert dense_digest(dense_request(x=x)) != dense_digest(dense_request(x=y))


def test_text_boundaries_matter():
    assert nlp_digest(nlp_pb2.PredictRequest(texts=["ab", "c"])) != nlp_digest(
        nlp_pb2.PredictRequest(texts=["a", "bc"])
    )


def test_gnn_stored_graph_and_node_ids_are_part_of_the_key():
    one = gnn_digest(gnn_pb2.PredictRequest(stored_graph="karate", node_ids=[1]))
    assert one != gnn_digest(gnn_pb2.PredictRequest(stored_graph="karate", node_ids=[2]))
    assert one != gnn_digest(gnn_pb2.PredictRequest(stored_graph="other", node_ids=[1]))


def test_key_names_family_model_and_version():
    assert result_key("dense", "digits-mlp", 3, "abc") == "maas:v1:result:dense:digits-mlp:3:abc"
