"""Training jobs for graph models: GCN, GraphSAGE, GAT or GIN node classifiers on an uploaded or
built-in graph, and graph classifiers (GraphSAGE, GAT or GIN, sum readout) on a built-in set of
small graphs. Every version records its held-out metrics and its ONNX export, or why it failed."""

from __future__ import annotations

import re

import numpy as np
import torch
from safetensors.torch import save

from services.gnn.architectures import build_network
from services.gnn.datasets import GraphData, GraphSetData
from services.gnn.defaults import graph_classifier_signature, node_classifier_signature
from services.gnn.export import model_files
from services.gnn.graph_store import GraphStore
from services.gnn.recommend import Interactions, bpr_epoch, evaluate, node_features
from services.gnn.sampling import csr_from_edges
from shared.errors import FailedPreconditionError, InvalidArgumentError
from shared.job_splits import TEST_SHARE, fit_and_evaluate, split_indices
from shared.training import make_optimizer, task_metrics
from shared.training_worker import JobContext, JobResult


def network_config(spec: dict, task: str, in_channels: int, classes: int) -> dict:
    hidden = spec["hidden_sizes"]
    return {"task": task, "architecture": spec["architecture"], "in_channels": int(in_channels), "hidden": hidden[0],
            "num_classes": classes, "num_layers": len(hidden) + 1,
            "dropout": 0.5 if spec["architecture"] == "gcn" else 0.0}  # fmt: skip


def run_job(context: JobContext) -> JobResult:
    data = context.dataset()
    torch.manual_seed(context.spec["seed"])
    if isinstance(data, Interactions):
        return recommender_job(context, data)
    if context.spec["architecture"] == "lightgcn":
        raise InvalidArgumentError("architecture: lightgcn trains recommenders on user-item interactions (user_ids, "
                                   "item_ids); this data set is a graph with labels")  # fmt: skip
    if isinstance(data, GraphSetData):
        return _graph_job(context, data)
    return _node_job(context, data)


def _node_job(context: JobContext, graph: GraphData) -> JobResult:
    spec = context.spec
    context.check_size([graph.node_features.shape[1]], len(graph.class_names), len(graph.labels))
    device = context.device
    x = torch.as_tensor(graph.node_features).to(device)
    edges = torch.as_tensor(graph.edge_index).to(device)
    y = torch.as_tensor(graph.labels).to(device)
    classes = len(graph.class_names)
    n = len(graph.labels)
    if graph.train_mask is not None:
        rest, test = np.flatnonzero(graph.train_mask), np.flatnonzero(~graph.train_mask)
    else:
        rest, test = split_indices(n, graph.labels, TEST_SHARE, spec["seed"])
    config = network_config(spec, "node", x.shape[1], classes)

    def fresh():
        net = build_network(config).to(device)
        return net, make_optimizer(spec["optimizer"], net.parameters(), spec["learning_rate"])

    def epoch_fn(net, opt, idx):
        index = torch.as_tensor(idx, device=device)

        def step(epoch: int) -> float:
            net.train()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x, edges)[index], y[index])
            loss.backward()
            opt.step()
            net.eval()
            return loss.item()

        return step

    def evaluate(net, idx) -> dict[str, float]:
        with torch.no_grad():
            return task_metrics("classification", graph.labels[idx], net(x, edges)[torch.as_tensor(idx)].cpu().numpy())

    net, metrics = fit_and_evaluate(context, n, graph.labels, rest, test, fresh, epoch_fn, evaluate)

    graph_name = re.sub(r"[^a-z0-9_-]", "-", context.dataset_name().lower()) or "train"
    graph_file = f"graph-{graph_name}.safetensors"
    config.update({"graphs": {graph_name: graph_file}, "job": context.job_id, "spec": spec})
    # In memory: weights and graph reach disk only sealed by the model store.
    files = model_files(net.cpu(), config)
    stored = save({"node_features": x.cpu().contiguous(), "edge_index": edges.cpu().contiguous()})
    record = {
        "family": "gnn",
        "framework": "torch",
        **node_classifier_signature(int(x.shape[1]), classes),
        "metrics": metrics,
        "class_names": graph.class_names,
        "description": f"{spec['architecture']} {spec['hidden_sizes']} node classifier trained on "
        f"{context.dataset_name()}; stored graph {graph_name!r}",
        "config": config,
    }
    context.message("evaluated; writing the version", state="EVALUATING")
    return context.publish(record, {**files, graph_file: stored}, "classification")


def _graph_job(context: JobContext, data: GraphSetData) -> JobResult:
    from torch_geometric.data import Batch, Data

    spec = context.spec
    if spec["architecture"] == "gcn":
        raise InvalidArgumentError("architecture: graph classification takes sage, gat or gin (a GCN has no readout)")
    width = data.node_features.shape[1]
    classes = len(data.class_names)
    context.check_size([width], classes, len(data.labels))
    device = context.device
    examples = [Data(x=torch.as_tensor(x), edge_index=torch.as_tensor(e), y=torch.tensor([int(label)]))
                for (x, e), label in zip(data.graphs, data.labels, strict=True)]  # fmt: skip
    config = network_config(spec, "graph", width, classes)
    n = len(examples)
    rest, test = split_indices(n, data.labels, TEST_SHARE, spec["seed"])

    def batch_of(idx) -> Batch:
        return Batch.from_data_list([examples[i] for i in idx]).to(device)

    def fresh():
        net = build_network(config).to(device)
        return net, make_optimizer(spec["optimizer"], net.parameters(), spec["learning_rate"])

    def epoch_fn(net, opt, idx):
        generator = torch.Generator().manual_seed(spec["seed"])

        def step(epoch: int) -> float:
            net.train()
            losses = []
            for chunk in torch.as_tensor(idx)[torch.randperm(len(idx), generator=generator)].split(spec["batch_size"]):
                batch = batch_of(chunk.tolist())
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(batch.x, batch.edge_index, batch.batch, batch.num_graphs),
                                                         batch.y)  # fmt: skip
                loss.backward()
                opt.step()
                losses.append(loss.item())
            net.eval()
            return float(np.mean(losses))

        return step

    def evaluate(net, idx) -> dict[str, float]:
        batch = batch_of(idx)
        with torch.no_grad():
            logits = net(batch.x, batch.edge_index, batch.batch, batch.num_graphs)
        return task_metrics("classification", data.labels[idx], logits.cpu().numpy())

    net, metrics = fit_and_evaluate(context, n, data.labels, rest, test, fresh, epoch_fn, evaluate)
    config.update({"job": context.job_id, "spec": spec})
    files = model_files(net.cpu(), config)
    record = {
        "family": "gnn",
        "framework": "torch",
        **graph_classifier_signature(width, classes),
        "metrics": metrics,
        "class_names": data.class_names,
        "description": f"{spec['architecture']} {spec['hidden_sizes']} graph classifier trained on "
        f"{context.dataset_name()}; call ClassifyGraphs",
        "config": config,
    }
    context.message("evaluated; writing the version", state="EVALUATING")
    return context.publish(record, files, "classification")


RECOMMEND_SIGNATURE = {
    "inputs": [
        {"name": "user_ids", "dtype": "INT64", "shape": [-1]},
        {"name": "top_k", "dtype": "INT64", "shape": [1]},
        {"name": "include_seen", "dtype": "BOOL", "shape": [1]},
    ],
    "outputs": [
        {"name": "items", "dtype": "INT64", "shape": [-1, -1]},
        {"name": "scores", "dtype": "FP32", "shape": [-1, -1]},
        {"name": "popularity_fallback", "dtype": "BOOL", "shape": [-1]},
    ],
}


def recommender_config(spec: dict, data: Interactions, graph: str) -> dict:
    hidden = spec["hidden_sizes"]
    if len(set(hidden)) != 1:
        raise InvalidArgumentError(f"hidden_sizes: lightgcn propagates one embedding through every layer, so the sizes "
                                   f"must be equal ([64, 64]: 64 wide, 2 layers), got {hidden}")  # fmt: skip
    return {"task": "recommend", "kind": "recommender", "architecture": "lightgcn", "embedding_dim": hidden[0],
            "num_layers": len(hidden), "num_users": data.num_users, "num_items": data.num_items,
            "in_channels": 1 + (0 if data.item_features is None else data.item_features.shape[1]),
            "graph": graph, "stored_graphs": [graph], "weights_file": "embedding.safetensors"}  # fmt: skip


def recommender_job(context: JobContext, data: Interactions) -> JobResult:
    """LightGCN with BPR on the interactions but each user's last, measured by recall@10 and NDCG@10 on those
    against popularity on the same split. The version's user-item graph (every interaction) goes to the graph
    store as `<output_model>-interactions`, once per job, where Recommend reads it and UpdateGraph grows it."""
    from torch_geometric.nn import LightGCN

    from shared.training import run_epochs

    spec = context.spec
    if spec["architecture"] != "lightgcn":
        raise InvalidArgumentError(f"architecture: {spec['architecture']} trains classifiers on labelled graphs; "
                                   "this data set is user-item interactions: train a recommender with "
                                   "lightgcn")  # fmt: skip
    nodes = data.num_users + data.num_items
    context.check_size([nodes], 1, data.num_examples)
    graph_name = f"{spec['output_model']}-interactions"[:63]
    if data.item_features is None and data.item_texts:  # before training: an nlp service that is down fails fast
        context.message(f"embedding the texts of {len(data.item_texts)} items with the nlp service")
        data.item_features = embed_item_texts(data.item_texts)
        context.heartbeat.beat()
    config = recommender_config(spec, data, graph_name)
    model = LightGCN(nodes, config["embedding_dim"], config["num_layers"])
    optimizer = make_optimizer(spec["optimizer"], model.parameters(), spec["learning_rate"])
    step = bpr_epoch(model, optimizer, data, spec["batch_size"], spec["seed"])
    losses = run_epochs(context, model, optimizer, spec["epochs"], step, dict)
    metrics = {**evaluate(model, data, 10), "final_train_loss": losses[-1]}
    context.message("evaluated; writing the user-item graph and the version", state="EVALUATING")
    stored = publish_interaction_graph(GraphStore(context.store), graph_name, data, context)
    weights = save({"embedding": model.embedding.weight.detach().cpu().contiguous()})
    record = {
        "family": "gnn",
        "framework": "torch",
        **RECOMMEND_SIGNATURE,
        "metrics": metrics,
        "description": f"LightGCN {config['embedding_dim']} x {config['num_layers']} layers, BPR, on "
        f"{context.dataset_name()} ({data.num_users} users, {data.num_items} items); call Recommend on "
        f"{graph_name!r} (v{stored.version} when trained)",
        "config": {**config, "graph_version": stored.version, "job": context.job_id, "spec": spec},
    }
    return context.publish(record, {config["weights_file"]: weights}, "ranking")


def publish_interaction_graph(graphs: GraphStore, name: str, data: Interactions, context: JobContext):
    """The user-item graph of every interaction, as a new version of `name` (made by this job at most once, even
    across retries); refused when the graph is another owner's."""
    owner = context.spec.get("tenant", "") if context.spec.get("private") else ""
    marker = f"job:{context.job_id}"
    if graphs.store.versions(name):
        if graphs.owner(name) != owner:
            raise FailedPreconditionError(f"output_model: the graph {name!r} this job would write belongs to another "
                                          "owner; nothing was written, choose another model name")  # fmt: skip
        latest = graphs.open(name)
        if graphs.store.manifest(name, latest.version).description.endswith(marker):
            return latest
    pairs = data.all_pairs()
    edges = np.stack([pairs[0], pairs[1] + data.num_users])
    edges = np.concatenate([edges, edges[::-1]], axis=1)
    indptr, indices = csr_from_edges(edges, data.num_users + data.num_items)
    about = f"user-item graph: users 0..{data.num_users - 1}, items {data.num_users}..; {marker}"
    return graphs.publish(name, indptr, indices, node_features(data), undirected=True, description=about, owner=owner)


EMBED_CHUNK = 64  # texts per call: within the nlp service's max batch


def embed_item_texts(texts: list[str]) -> np.ndarray:
    """The content vectors of items' texts, from the nlp service's embedding model (GnnContentSettings). An nlp
    service that cannot be reached fails the attempt as UNAVAILABLE, and the queue tries the job again."""
    import grpc

    from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
    from services.gnn.settings import GnnContentSettings
    from shared.errors import UnavailableError
    from shared.tensors import to_numpy

    settings = GnnContentSettings()
    vectors = []
    with grpc.insecure_channel(settings.nlp_target) as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        for start in range(0, len(texts), EMBED_CHUNK):
            chunk = [text or " " for text in texts[start : start + EMBED_CHUNK]]
            try:
                reply = stub.Predict(nlp_pb2.PredictRequest(model_name=settings.content_model, texts=chunk),
                                     timeout=settings.content_timeout_s)  # fmt: skip
            except grpc.RpcError as exc:
                error = UnavailableError if exc.code() == grpc.StatusCode.UNAVAILABLE else InvalidArgumentError
                raise error(f"item_texts: the nlp service at {settings.nlp_target} (MAAS_GNN_TRAINER_NLP_TARGET) "
                            f"could not embed them with {settings.content_model!r}: {exc.code().name}: "
                            f"{exc.details()}") from None  # fmt: skip
            if "embedding" not in reply.outputs:
                raise InvalidArgumentError(f"item_texts: {settings.content_model!r} (MAAS_GNN_TRAINER_CONTENT_MODEL) "
                                           "is not an embedding model")  # fmt: skip
            vectors.append(to_numpy(reply.outputs["embedding"], "embedding"))
    return np.concatenate(vectors).astype(np.float32)
