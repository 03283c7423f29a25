"""Graph classification's Open Inference inputs become one ClassifyGraphs request, graph by graph."""

import numpy as np
import pytest

from gateway.open_inference import MAX_GRAPHS, to_family_request
from inference import open_inference_pb2 as oip
from shared.errors import InvalidArgumentError
from shared.tensors import to_numpy


def infer_request(features: np.ndarray, edges: np.ndarray, ids: np.ndarray) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="motif-gin")
    for name, value, datatype in (("node_features", features, "FP32"), ("edge_index", edges, "INT64"),
                                  ("graph_ids", ids, "INT64")):  # fmt: skip
        request.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
        request.raw_input_contents.append(value.tobytes())
    return request


def test_the_union_is_split_back_into_its_graphs():
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    # graph 0: nodes 0-2, graph 1: node 3 alone, graph 2: nodes 4-5; edges listed out of graph order
    edges = np.array([[4, 0, 1, 5, 2], [5, 1, 2, 4, 0]], np.int64)
    ids = np.array([0, 0, 0, 1, 2, 2], np.int64)
    message = to_family_request("gnn", infer_request(features, edges, ids), 0, graphs=True)
    assert [g.node_features.shape[0] for g in message.graphs] == [3, 1, 2]
    got = [to_numpy(g.edge_index, "e").tolist() for g in message.graphs]
    assert got == [[[0, 1, 2], [1, 2, 0]], [[], []], [[0, 1], [1, 0]]]
    np.testing.assert_array_equal(to_numpy(message.graphs[2].node_features, "x"), features[4:])


@pytest.mark.parametrize(
    ("ids", "edges", "fragment"),
    [
        ([1, 1], [[0], [1]], "inputs ('graph_ids'): expected each node's graph, 0..G-1 in ascending order"),
        ([0, 2], [[0], [0]], "inputs ('graph_ids'): expected each node's graph, 0..G-1 in ascending order"),
        ([0], [[0], [0]], "inputs ('graph_ids'): expected INT64 of shape [2] (one per node)"),
        ([0, 1], [[0], [1]], "edge 0 (0 -> 1) joins graphs 0 and 1; an edge must stay within one graph"),
        ([0, 0], [[0], [2]], "inputs ('edge_index'): node index 2 is out of range for 2 nodes"),
    ],
)
def test_bad_graph_inputs_name_the_input(ids, edges, fragment):
    features = np.zeros((2, 3), np.float32)
    with pytest.raises(InvalidArgumentError) as err:
        to_family_request("gnn", infer_request(features, np.array(edges, np.int64), np.array(ids, np.int64)), 0,
                          graphs=True)  # fmt: skip
    assert fragment in err.value.message


def test_more_graphs_than_the_gateway_takes_are_refused_before_any_is_built():
    nodes = MAX_GRAPHS + 1
    ids = np.arange(nodes, dtype=np.int64)
    request = infer_request(np.zeros((nodes, 1), np.float32), np.zeros((2, 0), np.int64), ids)
    with pytest.raises(InvalidArgumentError) as err:
        to_family_request("gnn", request, 0, graphs=True)
    assert f"{nodes} graphs; at most {MAX_GRAPHS} per request" in err.value.message
