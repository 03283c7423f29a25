import numpy as np

from gateway.cache_key import request_digest, result_key
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2
from shared.tensors import from_numpy


def dense_digest(request):
    return request_digest("dense", request)


def gnn_digest(request):
    return request_digest("gnn", request)


def nlp_digest(request):
    return request_digest("nlp", request)


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


def test_the_model_is_named_by_the_key_not_the_digest():
    x = np.zeros((1, 4), np.float32)
    one = dense_pb2.PredictRequest(model_name="a", model_version=1, inputs={"x": from_numpy(x)})
    two = dense_pb2.PredictRequest(model_name="b", model_version=2, inputs={"x": from_numpy(x)})
    assert dense_digest(one) == dense_digest(two)


def test_output_names_and_an_inline_graph_are_part_of_the_key():
    x = np.zeros((1, 4), np.float32)
    assert dense_digest(dense_request(x=x)) != dense_digest(
        dense_pb2.PredictRequest(inputs={"x": from_numpy(x)}, output_names=["label"])
    )
    features = from_numpy(np.ones((2, 3), np.float32))
    edges = from_numpy(np.array([[0], [1]], np.int64))
    inline = gnn_pb2.PredictRequest(graph=gnn_pb2.Graph(node_features=features, edge_index=edges), node_ids=[0])
    weighted = gnn_pb2.PredictRequest(
        graph=gnn_pb2.Graph(node_features=features, edge_index=edges, edge_weight=from_numpy(np.ones(1, np.float32))),
        node_ids=[0],
    )
    assert gnn_digest(inline) != gnn_digest(weighted)
    assert gnn_digest(inline) != gnn_digest(gnn_pb2.PredictRequest(stored_graph="karate", node_ids=[0]))


def test_the_same_request_serialized_differently_has_one_key():
    request = dense_request(a=np.ones((2, 2), np.float32), b=np.zeros((1, 1), np.int64))
    reparsed = dense_pb2.PredictRequest.FromString(request.SerializeToString(deterministic=True))
    assert dense_digest(request) == dense_digest(reparsed)


def test_a_request_sent_unpacked_or_out_of_order_has_the_key_of_its_canonical_form():
    canonical = gnn_pb2.PredictRequest(stored_graph="karate", node_ids=[3, 1])
    # node_ids written unpacked (one tag per element), and before a field with a lower number.
    field = gnn_pb2.PredictRequest.DESCRIPTOR.fields_by_name["node_ids"].number
    unpacked = b"".join(bytes([field << 3 | 0, value]) for value in (3, 1))
    stored = gnn_pb2.PredictRequest(stored_graph="karate").SerializeToString()
    reordered = gnn_pb2.PredictRequest.FromString(unpacked + stored)
    assert reordered == canonical
    assert gnn_digest(reordered) == gnn_digest(canonical)


def test_the_digest_leaves_the_request_as_it_was():
    request = dense_pb2.PredictRequest(model_name="m", model_version=7, inputs={"x": from_numpy(np.ones(2))})
    before = request.SerializeToString()
    dense_digest(request)
    assert request.SerializeToString() == before


def test_the_family_or_rpc_is_part_of_the_digest():
    request = dense_pb2.PredictRequest()
    assert request_digest("dense", request) != request_digest("dense/Explain", request)
