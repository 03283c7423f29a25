"""For each family, a batch gives every item exactly what it gets when run alone (real default models)."""

import numpy as np
import torch

from services.dense.datasets import digits_split, sine_windows
from services.dense.runtime import onnx_loader
from services.gnn.runtime import GraphInput, gnn_loader
from services.nlp.runtime import nlp_loader
from shared.onnx_session import OnnxConfig

CPU = OnnxConfig(device="cpu")


def load(store, loader, name):
    manifest = store.manifest(name, store.default_version(name))
    return loader(manifest, store.artifacts(manifest))


def assert_same(batched, single):
    for name in single:
        if single[name].dtype.kind == "f":
            np.testing.assert_allclose(batched[name], single[name], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(batched[name], single[name])


def test_dense_models(model_store):
    _, x_test, _, _ = digits_split()
    _, windows, _, _ = sine_windows()
    cases = {
        "digits-mlp": [{"pixels": x_test[i : i + n]} for i, n in ((0, 1), (1, 5), (6, 2))],
        "digits-cnn": [{"image": x_test[i : i + n].reshape(-1, 1, 8, 8)} for i, n in ((0, 3), (3, 1), (4, 4))],
        "sine-gru": [{"window": windows[i : i + n]} for i, n in ((0, 2), (2, 7), (9, 1))],
    }
    for name, items in cases.items():
        model = load(model_store, onnx_loader(CPU), name)
        batched = model.run_batch(items)
        assert len(batched) == len(items)
        for item, result in zip(items, batched, strict=True):
            assert_same(result, model.predict(item))


def random_graph(rng, nodes, edges, weighted):
    return GraphInput(
        node_features=rng.random((nodes, 34), dtype=np.float32),
        edge_index=rng.integers(0, nodes, size=(2, edges)).astype(np.int64),
        edge_weight=rng.random(edges, dtype=np.float32) if weighted else None,
    )


def test_gnn_disjoint_union(model_store):
    model = load(model_store, gnn_loader(torch.device("cpu")), "karate-gcn")
    rng = np.random.default_rng(0)
    karate = model.graphs["karate"]
    graphs = [
        karate,
        random_graph(rng, 5, 8, False),
        random_graph(rng, 12, 30, True),
        karate,
        random_graph(rng, 1, 0, False),
    ]
    batched = model.run_batch(graphs)
    for graph, result in zip(graphs, batched, strict=True):
        assert result.shape == (graph.num_nodes, 4)
        np.testing.assert_allclose(result, model.predict(graph), rtol=1e-5, atol=1e-6)


def test_nlp_length_grouping(model_store):
    loader = nlp_loader(model_store, CPU, max_length=128)
    items = [
        ["short"],
        ["a much longer sentence that needs many more tokens than the others in this batch", "mid sized text here"],
        ["I love it", "I hate it", "the weather is fine today"],
    ] + [[f"text number {i} " * (i % 7 + 1)] for i in range(20)]
    for name in ("minilm-l6-v2", "sentiment"):
        model = load(model_store, loader, name)
        batched = model.run_batch(items)
        for texts, result in zip(items, batched, strict=True):
            single = model.predict(texts)
            for one, text in enumerate(texts):
                alone = model.predict([text])  # one text, no padding at all
                assert_same({k: v[one : one + 1] for k, v in result.items()}, alone)
            assert_same(result, single)


def test_gnn_graph_classification_batches_calls_as_one_union(model_store):
    from services.gnn.datasets import motif_graphs

    model = load(model_store, gnn_loader(torch.device("cpu")), "motif-gin")
    graphs = [GraphInput(x, e) for x, e, _ in motif_graphs(12, seed=9)]
    calls = [graphs[:1], graphs[1:6], graphs[6:7], graphs[7:]]
    batched = model.run_batch(calls)
    for call, result in zip(calls, batched, strict=True):
        assert result.shape == (len(call), 2)
        np.testing.assert_allclose(result, np.concatenate(model.run_batch([[g] for g in call])), rtol=1e-5, atol=1e-6)


def test_gnn_graph_classifier_on_onnx_runtime_batches_and_matches_torch(model_store):
    """motif-gin's ONNX export is served by ONNX Runtime: a batch of calls gives what each call gets alone,
    and every graph's probabilities are torch's within 1e-5."""
    from services.gnn.datasets import motif_graphs

    served = load(model_store, gnn_loader(torch.device("cpu"), CPU), "motif-gin")
    reference = load(model_store, gnn_loader(torch.device("cpu")), "motif-gin")
    assert served.session is not None and served.device == "CPUExecutionProvider"
    graphs = [GraphInput(x, e) for x, e, _ in motif_graphs(12, seed=9)]
    calls = [graphs[:1], graphs[1:6], graphs[6:7], graphs[7:]]
    batched = served.run_batch(calls)
    for call, result, expected in zip(calls, batched, reference.run_batch(calls), strict=True):
        assert result.shape == (len(call), 2)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(result, np.concatenate(served.run_batch([[g] for g in call])), rtol=0, atol=1e-6)
