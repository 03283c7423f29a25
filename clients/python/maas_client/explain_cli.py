"""`maasctl explain`: top attributions on the terminal, and a PNG of them.

    maasctl explain dense digits-mlp --input pixels=digit.npy --top 8 --png digit.png
    maasctl explain text sentiment "The food was wonderful" --png tokens.png
    maasctl explain text minilm-l6-v2 "A cat sits on the mat" --compare "A kitten on a rug"
    maasctl explain graph karate-gcn --stored-graph karate --nodes 0 --png graph.png
    maasctl explain graph lesmis-links --stored-graph les-miserables --pairs 11:48,0:1 --png links.png
    maasctl explain graph motif-gin --graph house.json --png motif.png
    maasctl explain graph sbm-sage --stored-graph sbm-100k --nodes 7 --fan-outs 5,5
    maasctl explain dense digits-cnn --input image=digits.npy --method kernel_shap --steps 2000 --job

The PNG is a heat map over the input (8x8 digits and other images, or a bar chart of the features),
the text with each token shaded by its attribution, or the subgraph used (the nodes', the pairs'
or the whole graph's) with the important edges drawn bold. --job runs the explanation as a job and waits for it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maas_client import calls
from maas_client.calls import (
    DenseExplanation,
    GraphExplanation,
    TextExplanation,
    dense_explain_request,
    gnn_explain_request,
    nlp_explain_request,
)
from maas_client.client import Client
from maas_client.errors import MaasError


def add_explain_commands(commands, read_inputs: Callable, read_graph: Callable, numeric_dtype: Callable) -> None:
    explain = commands.add_parser("explain", help="why a model predicted what it did").add_subparsers(
        dest="explain_command", required=True
    )
    dense = explain.add_parser("dense", help="feature attributions of a dense model's prediction")
    dense.add_argument("model")
    dense.add_argument("--input", "-i", action="append", default=[], metavar="[NAME=]FILE|JSON",
                       help="an input, as for predict")  # fmt: skip
    dense.add_argument("--baseline", action="append", default=[], metavar="[NAME=]FILE|JSON",
                       help="a baseline (default: zeros), the input's shape or one row's")  # fmt: skip
    dense.add_argument("--dtype", type=numeric_dtype, default="float32", help="dtype for CSV and JSON inputs")
    dense.add_argument("--method", default="", help="integrated_gradients, feature_ablation or kernel_shap")
    dense.add_argument("--steps", type=int, default=0, help="integration steps or KernelShap samples")
    dense.add_argument("--target", type=int, help="the output column to explain (default: the predicted class)")
    dense.set_defaults(run=lambda client, args: cmd_explain_dense(client, args, read_inputs))

    text = explain.add_parser("text", help="token attributions of a text classifier or of two texts' similarity")
    text.add_argument("model")
    text.add_argument("text")
    text.add_argument("--compare", default="", help="embedding models: explain the similarity to this text")
    text.add_argument("--method", default="", help="occlusion (the default)")
    text.add_argument("--target", type=int, help="the class to explain (default: the predicted one)")
    text.set_defaults(run=cmd_explain_text)

    graph = explain.add_parser("graph", help="edges and node features a gnn's prediction rests on")
    graph.add_argument("model")
    graph.add_argument("--nodes", default="", help="node classifiers: comma-separated node ids, explained together")
    graph.add_argument("--pairs", default="", help="link predictors: comma-separated u:v pairs, e.g. 11:48,0:1")
    graph.add_argument("--stored-graph", default="",
                       help="a graph stored with the model (karate) or in the graph store (sbm-100k)")  # fmt: skip
    graph.add_argument("--graph-version", type=int, default=0, help="a graph-store graph's version (default latest)")
    graph.add_argument("--fan-outs", default="", help="a graph-store graph: neighbours per hop, e.g. 10,10")
    graph.add_argument("--graph", type=Path, help="a graph file (.json or .npz), as for graph predict")
    graph.add_argument("--method", default="", help="gnn_explainer (default), integrated_gradients or saliency")
    graph.add_argument("--epochs", type=int, default=0, help="GNNExplainer epochs or integration steps")
    graph.add_argument("--target", type=int, help="the class to explain (default: each node's predicted one)")
    graph.add_argument("--seed", type=int, default=0)
    graph.set_defaults(run=lambda client, args: cmd_explain_graph(client, args, read_graph))

    for command in (dense, text, graph):
        command.add_argument("--version", type=int, default=0, help="model version (default: the default version)")
        command.add_argument("--top", type=int, default=10, help="how many attributions to print")
        command.add_argument("--png", type=Path, help="save a picture of the explanation here")
        command.add_argument("--job", action="store_true", help="run it as an explanation job and wait for it")


def _run(client: Client, request, args: argparse.Namespace, direct: Callable, text: str = ""):
    """The explanation, from the rpc or (--job) from a job the command waits for."""
    if not args.job:
        return direct()
    job = client.explanations.submit(request)
    print(f"job {job.job.job_id} queued (explains {job.job.model_name} v{job.job.model_version})")
    done = client.explanations.wait(job.job.job_id, text=text, timeout=max(args.timeout, 3600.0))
    if done.explanation is None:
        raise MaasError(f"explanation job {done.job.job_id} ended {done.state}: {done.job.error}")
    return done.explanation


def cmd_explain_dense(client: Client, args: argparse.Namespace, read_inputs: Callable) -> None:
    if not args.input:
        raise ValueError("explain dense needs at least one --input")
    inputs = read_inputs(args.input, args.dtype)
    baselines = read_inputs(args.baseline, args.dtype) if args.baseline else None
    if "" in inputs or (baselines and "" in baselines):
        name = client.run(calls.single_input(client.lookups, args.model, args.version))
        inputs = {name if key == "" else key: value for key, value in inputs.items()}
        baselines = {name if key == "" else key: value for key, value in (baselines or {}).items()} or None
    request = dense_explain_request(args.model, inputs, args.method, baselines, args.steps, args.target, args.version)
    result: DenseExplanation = _run(client, request, args, lambda: client.dense.explain(
        args.model, inputs, method=args.method, baselines=baselines, steps=args.steps, target=args.target,
        version=args.version))  # fmt: skip
    print(f"{result.model} v{result.version}, {result.method}")
    for name, attributions in result.attributions.items():
        for row in range(attributions.shape[0]):
            flat = attributions[row].ravel()
            order = np.argsort(-np.abs(flat))[: args.top]
            shape = attributions.shape[1:]
            where = [f"{name}[{','.join(map(str, np.unravel_index(i, shape)))}]" for i in order]
            print(f"row {row}: output {result.targets[row]} = {result.scores[row]:.4f} "
                  f"(baseline {result.baseline_scores[row]:.4f}); sum of attributions {flat.sum():+.4f}")  # fmt: skip
            for label, i in zip(where, order, strict=True):
                print(f"  {label:<16} {flat[i]:+.4f}")
    if args.png:
        save_dense_png(result, inputs, args.png)
        print(f"saved {args.png}")


def cmd_explain_text(client: Client, args: argparse.Namespace) -> None:
    request = nlp_explain_request(args.model, args.text, args.method, args.target, args.compare, args.version)
    result: TextExplanation = _run(client, request, args, lambda: client.nlp.explain(
        args.model, args.text, compare_text=args.compare, method=args.method, target=args.target,
        version=args.version), args.text)  # fmt: skip
    what = f"label {result.label!r}" if result.label else f"similarity to {args.compare!r}"
    print(f"{result.model} v{result.version}, {result.method}: {what} = {result.score:.4f} "
          f"(every token removed: {result.baseline_score:.4f})")  # fmt: skip
    for token, score in result.top(args.top):
        print(f"  {token:<16} {score:+.4f}")
    if args.png:
        save_text_png(result, args.png)
        print(f"saved {args.png}")


def _pairs(text: str) -> np.ndarray | None:
    if not text.strip():
        return None
    try:
        return np.array([[int(end) for end in pair.split(":")] for pair in text.split(",")], np.int64).T.reshape(2, -1)
    except ValueError:
        raise ValueError(f"--pairs {text!r}: expected comma-separated u:v node id pairs, e.g. 11:48,0:1") from None


def _what(result: GraphExplanation, pairs: np.ndarray | None) -> str:
    """What was explained, and the prediction: nodes' labels, pairs' scores or the graph's label."""
    if pairs is not None:
        scores = result.outputs["scores"]
        return "links " + ", ".join(f"{u}-{v} ({s:.3f})" for u, v, s in zip(*pairs.tolist(), scores.tolist(),
                                                                           strict=True))  # fmt: skip
    labels = result.outputs["label"].tolist()
    if not len(result.node_ids):
        return f"the graph, labelled {labels[0]}"
    return f"nodes {result.node_ids.tolist()} labelled {labels}"


def cmd_explain_graph(client: Client, args: argparse.Namespace, read_graph: Callable) -> None:
    nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
    pairs = _pairs(args.pairs)
    fan_outs = [int(f) for f in args.fan_outs.split(",") if f.strip()]
    graph = read_graph(args.graph) if args.graph and not args.stored_graph else {}
    if not args.stored_graph and not graph:
        raise ValueError("explain graph needs --stored-graph or --graph")
    request = gnn_explain_request(args.model, nodes, graph.get("node_features"), graph.get("edge_index"),
                                  graph.get("edge_weight"), args.stored_graph, args.method, args.epochs, args.target,
                                  args.seed, args.version, pairs, args.graph_version, fan_outs)  # fmt: skip
    result: GraphExplanation = _run(client, request, args, lambda: client.gnn.explain(
        args.model, nodes, stored_graph=args.stored_graph, pairs=pairs, graph_version=args.graph_version,
        fan_outs=fan_outs, method=args.method, epochs=args.epochs, target=args.target, seed=args.seed,
        version=args.version, **graph))  # fmt: skip
    on = f" (graph v{result.graph_version}, masks over the sampled subgraph)" if result.graph_version else ""
    print(f"{result.model} v{result.version}, {result.method}: {_what(result, pairs)}; subgraph of "
          f"{len(result.subgraph_node_ids)} nodes, {len(result.subgraph_edge_ids)} edges{on}")  # fmt: skip
    importance = result.edge_mask[result.subgraph_edge_ids]
    print("top edges:")
    for i in np.argsort(-importance)[: args.top]:
        source, target = result.subgraph_edge_index[:, i]
        print(f"  {source:>5} -> {target:<5} {importance[i]:.4f}")
    features = result.node_feature_mask.sum(axis=0)
    print("top node features (summed over nodes):")
    for feature in np.argsort(-features)[: min(args.top, len(features))]:
        print(f"  feature {feature:<6} {features[feature]:.4f}")
    if args.png:
        save_graph_png(result, args.png, pairs)
        print(f"saved {args.png}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_dense_png(result: DenseExplanation, inputs: dict, path: Path) -> None:
    """Input and attribution side by side for up to four rows; images (and 64 features) as 8x8 heat maps."""
    plt = _pyplot()
    name, attributions = next(iter(result.attributions.items()))
    values = np.asarray(inputs[name])
    rows = min(4, attributions.shape[0])
    figure, axes = plt.subplots(rows, 2, figsize=(6, 3 * rows), squeeze=False)
    for row in range(rows):
        flat = attributions[row].ravel()
        side = math.isqrt(flat.size)
        picture_axis, heat_axis = axes[row]
        if side * side == flat.size:
            picture_axis.imshow(values[row].reshape(side, side), cmap="gray_r")
            limit = np.abs(flat).max() or 1.0
            shown = heat_axis.imshow(flat.reshape(side, side), cmap="RdBu_r", vmin=-limit, vmax=limit)
            figure.colorbar(shown, ax=heat_axis, fraction=0.046)
        else:
            picture_axis.bar(range(flat.size), values[row].ravel())
            heat_axis.bar(range(flat.size), flat, color=np.where(flat >= 0, "tab:red", "tab:blue"))
        picture_axis.set_title(f"row {row}: input")
        heat_axis.set_title(f"{result.method}: output {result.targets[row]}")
        for axis in (picture_axis, heat_axis):
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_text_png(result: TextExplanation, path: Path) -> None:
    """The text, each token on a background from blue (against) to red (for) by its attribution."""
    plt = _pyplot()
    from matplotlib import colormaps

    colours = colormaps["RdBu_r"]
    limit = float(np.abs(result.attributions).max()) or 1.0
    figure = plt.figure(figsize=(10, 1.2 + 0.5 * (len(result.text) // 70)))
    figure.text(0.01, 0.92, f"{result.model}: {result.label or 'similarity'} ({result.score:.3f}), {result.method}",
                fontsize=10, va="top")  # fmt: skip
    x, y = 0.01, 0.6
    renderer = figure.canvas.get_renderer()
    for (start, end), attribution in zip(result.spans, result.attributions, strict=True):
        word = result.text[start:end]
        shade = colours(0.5 + 0.5 * float(attribution) / limit)
        ink = "white" if abs(float(attribution)) > 0.6 * limit else "black"
        label = figure.text(x, y, word, fontsize=14, va="top", color=ink,
                            bbox={"facecolor": shade, "edgecolor": "none", "pad": 2})
        width = label.get_window_extent(renderer).width / figure.bbox.width
        x += width + 0.008
        if x > 0.95:
            x, y = 0.01, y - 0.25
            label.set_position((x, y))
            x += width + 0.008
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_graph_png(result: GraphExplanation, path: Path, pairs: np.ndarray | None = None) -> None:
    """The subgraph used, the explained nodes (or pairs' endpoints) in red, edges' width and darkness by importance
    (the top ones bold); for a graph classifier, the whole graph."""
    import networkx as nx

    plt = _pyplot()
    graph = nx.DiGraph()
    graph.add_nodes_from(result.subgraph_node_ids.tolist())
    weights = {}
    for i, edge in enumerate(result.subgraph_edge_ids):
        source, target = (int(node) for node in result.subgraph_edge_index[:, i])
        weights[(source, target)] = max(weights.get((source, target), 0.0), float(result.edge_mask[edge]))
    graph.add_edges_from(weights)
    top = np.quantile(list(weights.values()), 0.9) if weights else 0.0
    position = nx.spring_layout(graph.to_undirected(), seed=0)
    figure, axis = plt.subplots(figsize=(7, 7))
    peak = max(weights.values(), default=1.0) or 1.0
    nx.draw_networkx_edges(graph, position, ax=axis, arrows=False,
                           width=[0.5 + (4.0 if w >= top else 1.5) * w / peak for w in weights.values()],
                           edge_color=[w / peak for w in weights.values()], edge_cmap=plt.cm.Greys,
                           edge_vmin=-0.2, edge_vmax=1.0)  # fmt: skip
    explained = set(result.node_ids.tolist()) | set(() if pairs is None else pairs.reshape(-1).tolist())
    if pairs is not None:  # the links explained, dashed
        nx.draw_networkx_edges(graph, position, ax=axis, edgelist=[tuple(p) for p in pairs.T.tolist()],
                               style="dashed", edge_color="tab:red", arrows=False)  # fmt: skip
    nx.draw_networkx_nodes(graph, position, ax=axis, node_size=120,
                           node_color=["tab:red" if n in explained else "tab:blue" for n in graph.nodes])  # fmt: skip
    nx.draw_networkx_labels(graph, position, ax=axis, font_size=7)
    if pairs is not None:
        what = f"pairs {pairs.T.tolist()}"
    else:
        what = f"nodes {sorted(explained)}" if explained else "the graph"
    axis.set_title(f"{result.model}: {what}, {result.method}")
    axis.axis("off")
    figure.savefig(path, dpi=100)
    plt.close(figure)
