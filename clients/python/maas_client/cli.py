"""maasctl: maas from the command line.

    maasctl health
    maasctl predict digits-mlp --input pixels=digits.npy
    maasctl embed "A man is playing a guitar." "Someone plays the guitar."
    maasctl classify --file reviews.txt
    maasctl graph predict karate-gcn --stored-graph karate --nodes 0,16,33
    maasctl recommend shop-lightgcn --users 0,1,2 --top 5 | similar shop-lightgcn --items 600 --top 5
    maasctl models list | show NAME | promote NAME VERSION | rollback NAME | canary NAME VERSION PERCENT
    maasctl models shadow NAME VERSION PERCENT
    maasctl datasets upload iris.csv --family dense | list | show DATASET_ID
    maasctl train submit --family dense --arch mlp --dataset iris --output-model iris-mlp --watch --plot curves.png
    maasctl train watch JOB_ID --plot curves.png
    maasctl jobs list | cancel JOB_ID
    maasctl keys rotate --to NEW_KEK_ID [--tenant T] | list      (admin)
    maasctl explain dense|text|graph MODEL ... [--top K] [--png FILE] [--job]   (maasctl explain --help)

The gateway comes from --target or $MAAS_TARGET, the API key from --api-key or $MAAS_API_KEY.
A failure prints one line, `maasctl: error: ...`, and exits 1 (2 for a bad command line).
"""

from __future__ import annotations

import os

# gRPC's core logs handshake failures on stderr, where maasctl reports errors in one line of
# its own. The level is read once, when gRPC loads: below, before the first import of grpc.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from maas.common.v1 import model_pb2, tensor_pb2  # noqa: E402
from maas.training.v1 import training_pb2  # noqa: E402
from maas_client.client import FAMILIES, Client, Prediction, family_name, state_name  # noqa: E402
from maas_client.errors import MaasError  # noqa: E402
from maas_client.explain_cli import add_explain_commands  # noqa: E402


class UsageError(Exception):
    """Bad input from the command line or a file it names: exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported in one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"maasctl: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with Client(
            args.target,
            api_key=args.api_key,
            tls=args.tls,
            root_certificates=args.ca,
            certificate_chain=args.cert,
            private_key=args.key,
            timeout=args.timeout,
        ) as client:
            return args.run(client, args) or 0
    except MaasError as error:
        print(f"maasctl: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`maasctl jobs list | head`): not an error worth a message.
        sys.stdout = open(os.devnull, "w")  # so that flushing at exit does not fail again
        return 0
    except (UsageError, ValueError, TypeError, OSError) as error:
        print(f"maasctl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maasctl: error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a command line answers in one line, never a traceback
        if os.environ.get("MAASCTL_DEBUG"):
            raise
        print(
            f"maasctl: error: unexpected {type(error).__name__}: {error} (MAASCTL_DEBUG=1 shows where)", file=sys.stderr
        )
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="maasctl", description="Call a maas gateway.")
    parser.add_argument("--target", help="gateway host:port (default: $MAAS_TARGET, then localhost:50051)")
    parser.add_argument("--api-key", help="API key (default: $MAAS_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", type=Path, help="PEM file of the CA that signed the gateway's certificate")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", type=Path, help="client private key (PEM), for mutual TLS")
    parser.add_argument("--timeout", type=seconds, default=30.0, help="deadline of each call, in seconds")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    health = commands.add_parser("health", help="is the gateway serving, and each family behind it")
    health.set_defaults(run=cmd_health)

    predict = commands.add_parser("predict", help="run a dense model")
    predict.add_argument("model")
    predict.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="[NAME=]FILE|JSON",
        help="an input: a .npy, .npz, .csv or .json file, or a JSON array; NAME= may be left out for one input",
    )
    predict.add_argument(
        "--dtype", type=numeric_dtype, default="float32", help="dtype for CSV and JSON inputs (default float32)"
    )
    predict.add_argument("--version", type=int, default=0, help="model version (default: the default version)")
    predict.add_argument("--output-name", action="append", default=[], help="only these outputs")
    add_output_options(predict)
    predict.set_defaults(run=cmd_predict)

    for name, help_text, default_model in (
        ("embed", "sentence embeddings of texts", "minilm-l6-v2"),
        ("classify", "classify texts", "sentiment"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("texts", nargs="*", metavar="TEXT")
        command.add_argument("--file", "-f", type=Path, help="read texts from a file, one per line")
        command.add_argument("--model", default=default_model, help=f"default: {default_model}")
        add_output_options(command)
        command.set_defaults(run=cmd_embed if name == "embed" else cmd_classify)

    graph = commands.add_parser("graph", help="graph models").add_subparsers(dest="graph_command", required=True)
    graph_predict = graph.add_parser("predict", help="node predictions from a gnn model")
    graph_predict.add_argument("model")
    source = graph_predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--stored-graph", help="a graph stored with the model, e.g. karate")
    source.add_argument(
        "--graph", type=Path, help=".json or .npz with node_features (N x F), edge_index (2 x E), edge_weight"
    )
    graph_predict.add_argument("--nodes", default="", help="comma-separated node ids (default: all)")
    add_output_options(graph_predict)
    graph_predict.set_defaults(run=cmd_graph_predict)

    recommend = commands.add_parser("recommend", help="top items per user from a recommender")
    recommend.add_argument("model")
    recommend.add_argument("--users", required=True, help="comma-separated user node ids")
    recommend.add_argument("--top", type=int, default=10, help="items per user (default 10)")
    recommend.add_argument("--include-seen", action="store_true", help="also rank the items a user has had")
    similar = commands.add_parser("similar", help="the items most similar to items, by content or by co-use")
    similar.add_argument("model")
    similar.add_argument("--items", required=True, help="comma-separated item node ids")
    similar.add_argument("--top", type=int, default=10, help="similar items per item (default 10)")
    similar.add_argument("--by", choices=["content", "collaborative"], help="default: content where items have it")
    for command, run in ((recommend, cmd_recommend), (similar, cmd_similar)):
        command.add_argument("--stored-graph", default="",
                             help="a user-item graph made from the model's (default: its own)")  # fmt: skip
        command.add_argument("--graph-version", type=int, default=0, help="default: the latest")
        command.add_argument("--version", type=int, default=0, help="model version (default: the default one)")
        add_output_options(command)
        command.set_defaults(run=run)

    models = commands.add_parser("models", help="the model repository").add_subparsers(
        dest="models_command", required=True
    )
    listing = models.add_parser("list", help="models and their default versions")
    listing.add_argument("--family", choices=FAMILIES)
    listing.set_defaults(run=cmd_models_list)
    show = models.add_parser("show", help="a model's versions, metrics and signature")
    show.add_argument("model")
    show.set_defaults(run=cmd_models_show)
    promote = models.add_parser("promote", help="make a version the default")
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    promote.set_defaults(run=cmd_models_promote)
    rollback = models.add_parser("rollback", help="make the version before the default the default")
    rollback.add_argument("model")
    rollback.set_defaults(run=cmd_models_rollback)
    canary = models.add_parser("canary", help="send a share of the default traffic to a candidate version")
    canary.add_argument("model")
    canary.add_argument("version", type=int)
    canary.add_argument("percent", type=int, help="1 to 99; 0 ends the split")
    canary.set_defaults(run=cmd_models_canary)
    shadow = models.add_parser("shadow", help="send copies of a share of the default traffic to a version")
    shadow.add_argument("model")
    shadow.add_argument("version", type=int)
    shadow.add_argument("percent", type=int, help="1 to 100; 0 stops the copies")
    shadow.set_defaults(run=cmd_models_shadow)

    datasets = commands.add_parser("datasets", help="training data").add_subparsers(
        dest="datasets_command", required=True
    )
    upload = datasets.add_parser("upload", help="upload a data set (.npz, .csv, .json, .jsonl)")
    upload.add_argument("file", type=Path)
    upload.add_argument("--family", required=True, choices=FAMILIES)
    upload.add_argument("--format", choices=["npz", "csv", "json", "jsonl"], help="default: from the file's suffix")
    upload.add_argument("--name", default="", help="default: the file's name")
    upload.set_defaults(run=cmd_datasets_upload)
    datasets_list = datasets.add_parser("list", help="your uploaded data sets, and the built-in ones")
    datasets_list.add_argument("--family", choices=FAMILIES)
    datasets_list.set_defaults(run=cmd_datasets_list)
    datasets_show = datasets.add_parser("show", help="an uploaded data set's record")
    datasets_show.add_argument("dataset_id")
    datasets_show.set_defaults(run=cmd_datasets_show)

    train = commands.add_parser("train", help="training jobs").add_subparsers(dest="train_command", required=True)
    submit = train.add_parser("submit", help="queue a training job")
    submit.add_argument("--family", required=True, choices=FAMILIES)
    submit.add_argument("--arch", required=True,
                        help="dense: mlp, cnn, gru; gnn: gcn, sage, gat, gin, lightgcn (recommender); nlp: linear, mlp")
    data = submit.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset",
                      help="a built-in data set, e.g. iris, digits, karate, interactions, sentiment (datasets list)")
    data.add_argument("--dataset-id", help="an uploaded data set")
    submit.add_argument("--output-model", default="", help="the model the new version belongs to")
    submit.add_argument("--epochs", type=int, default=0)
    submit.add_argument("--batch-size", type=int, default=0)
    submit.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    submit.add_argument("--lr", type=float, help="learning rate (default 0.001)")
    submit.add_argument("--hidden", default="", help="hidden layer sizes, e.g. 64,32")
    submit.add_argument("--validation-split", type=float, default=0.0)
    submit.add_argument("--k-folds", type=int, default=0)
    submit.add_argument("--gate-metric", default="", help="held-out metric the promotion gate reads")
    submit.add_argument("--gate-min", type=float, help="promote only if the metric is at least this")
    submit.add_argument("--gate-max", type=float, help="promote only if the metric is at most this")
    submit.add_argument("--better-than-default", action="store_true", help="promote only if it beats the default")
    submit.add_argument("--idempotency-key", default="", help="submitting the same key again returns the first job")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--private", action="store_true", help="the new version is visible to this tenant only")
    submit.add_argument("--drop-columns", default="", help="CSV columns removed before training, e.g. name,email")
    submit.add_argument("--mask-columns", default="", help="CSV columns zeroed before training (and ignored after)")
    submit.add_argument("--workers", type=int, default=0,
                        help="data-parallel workers (world_size; dense and nlp), 1 by default")  # fmt: skip
    submit.add_argument("--watch", action="store_true", help="then watch the job to its end")
    submit.add_argument("--plot", type=Path, help="with --watch: save loss and metric curves to this PNG")
    submit.add_argument("--max-wait", type=seconds, default=86400.0, help="with --watch: give up after this many s")
    submit.set_defaults(run=cmd_train_submit)
    watch = train.add_parser("watch", help="follow a job to its end: progress, then its metrics")
    watch.add_argument("job_id")
    watch.add_argument("--plot", type=Path, help="save loss and metric curves to this PNG")
    watch.add_argument("--max-wait", type=seconds, default=86400.0, help="give up after this many seconds")
    watch.set_defaults(run=cmd_train_watch)

    jobs = commands.add_parser("jobs", help="training jobs").add_subparsers(dest="jobs_command", required=True)
    jobs_list = jobs.add_parser("list", help="jobs, newest first")
    jobs_list.add_argument("--family", choices=FAMILIES)
    jobs_list.add_argument("--limit", type=int, default=20)
    jobs_list.set_defaults(run=cmd_jobs_list)
    cancel = jobs.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=cmd_jobs_cancel)

    keys = commands.add_parser("keys", help="key-encryption keys of the stores (admin)").add_subparsers(
        dest="keys_command", required=True
    )
    rotate = keys.add_parser("rotate", help="re-wrap every data key under a new KEK, while serving goes on")
    rotate.add_argument("--to", dest="to_kek_id", required=True, metavar="NEW_KEK_ID",
                        help="the new KEK's id: a key file in every process's keys directory (Secret)")  # fmt: skip
    rotate.add_argument("--tenant", default="", help="only this tenant's private models and data sets")
    rotate.set_defaults(run=cmd_keys_rotate)
    keys_list = keys.add_parser("list", help="per store: the active KEK, the KEKs available, data keys per KEK")
    keys_list.set_defaults(run=cmd_keys_list)
    add_explain_commands(commands, read_inputs, read_graph, numeric_dtype)
    return parser


def add_output_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--json", action="store_true", help="print the outputs as one JSON object")
    command.add_argument("--save", type=Path, help="save the outputs to a .npz (or .npy for one output) file")


# --- commands ---------------------------------------------------------------------------------


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    report = client.health()
    print_table(["component", "status"], list(report.items()))
    return 0 if all(status == "SERVING" for status in report.values()) else 1


def cmd_predict(client: Client, args: argparse.Namespace) -> None:
    if not args.input:
        raise UsageError("predict needs at least one --input")
    inputs = read_inputs(args.input, args.dtype)
    array_or_inputs = inputs.pop("") if set(inputs) == {""} else inputs
    if "" in inputs:
        raise UsageError("name every --input (NAME=...) when there are several")
    result = client.dense.predict(args.model, array_or_inputs, version=args.version, outputs=args.output_name)
    show_prediction(result, args)


def cmd_embed(client: Client, args: argparse.Namespace) -> None:
    result = client.nlp.predict(args.model, read_texts(args))
    show_prediction(result, args)


def cmd_classify(client: Client, args: argparse.Namespace) -> None:
    texts = read_texts(args)
    result = client.nlp.classify(texts, model=args.model)
    if args.json or args.save:
        show_prediction(result, args)
        return
    probabilities = result.outputs.get("probabilities")
    rows = []
    for index, (text, label) in enumerate(zip(texts, result.labels, strict=True)):
        confidence = f"{probabilities[index].max():.3f}" if probabilities is not None else ""
        rows.append([label, confidence, shorten(text, 60)])
    print(f"{result.model} v{result.version}")
    print_table(["label", "p", "text"], rows)


def cmd_graph_predict(client: Client, args: argparse.Namespace) -> None:
    nodes = [int(n) for n in args.nodes.split(",") if n.strip()] if args.nodes else []
    if args.stored_graph:
        result = client.gnn.predict(args.model, stored_graph=args.stored_graph, node_ids=nodes)
    else:
        graph = read_graph(args.graph)
        result = client.gnn.predict(args.model, node_ids=nodes, **graph)
    if args.json or args.save:
        show_prediction(result, args, extra={"node_ids": result.node_ids})
        return
    print(f"{result.model} v{result.version}")
    labels = result.outputs.get("label")
    rows = [[int(node), int(labels[i]) if labels is not None else ""] for i, node in enumerate(result.node_ids)]
    print_table(["node", "label"], rows)


def node_list(text: str, flag: str) -> list[int]:
    try:
        ids = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated node ids, got {text!r}") from None
    if not ids:
        raise UsageError(f"{flag}: name at least one node id")
    return ids


def cmd_recommend(client: Client, args: argparse.Namespace) -> None:
    result = client.gnn.recommend(args.model, node_list(args.users, "--users"), top_k=args.top,
                                  include_seen=args.include_seen, stored_graph=args.stored_graph,
                                  graph_version=args.graph_version, version=args.version)  # fmt: skip
    show_ranking(result, args, "user")


def cmd_similar(client: Client, args: argparse.Namespace) -> None:
    result = client.gnn.similar_items(args.model, node_list(args.items, "--items"), top_k=args.top, by=args.by or "",
                                      stored_graph=args.stored_graph, graph_version=args.graph_version,
                                      version=args.version)  # fmt: skip
    show_ranking(result, args, "item")


def show_ranking(result, args: argparse.Namespace, what: str) -> None:
    if args.json or args.save:
        show_prediction(result, args, extra={f"{what}_ids": result.node_ids})
        return
    how = f", by {result.by}" if result.by else ""
    print(f"{result.model} v{result.version} on graph v{result.graph_version}{how}")
    rows = []
    for row, node in enumerate(result.node_ids):
        cold = " (popular: no interactions)" if what == "user" and result.popularity_fallback[row] else ""
        ranked = [f"{int(i)} ({s:.3f})" for i, s in zip(result.items[row], result.scores[row], strict=True) if i >= 0]
        rows.append([int(node), ", ".join(ranked) + cold])
    print_table([what, "items, best first (score)"], rows)


def cmd_models_list(client: Client, args: argparse.Namespace) -> None:
    rows = []
    for family, model in client.models.list(args.family):
        default = next((v for v in model.versions if v.version == model.default_version), None)
        metrics = format_metrics(default.metrics) if default else ""
        canary = f" + v{model.canary.model_version} at {model.canary.percent}%" if model.HasField("canary") else ""
        if model.HasField("shadow"):
            canary += f", shadow v{model.shadow.model_version} at {model.shadow.percent}%"
        rows.append([model.name, family, f"v{model.default_version}{canary}", len(model.versions), metrics])
    print_table(["model", "family", "default", "versions", "metrics (default)"], rows)


def cmd_models_show(client: Client, args: argparse.Namespace) -> None:
    listing = client.models.versions(args.model)
    pinned = " (pinned)" if listing.default_pinned else ""
    print(f"{args.model}: default v{listing.default_version}{pinned}")
    rows = []
    for version in sorted(listing.versions, key=lambda v: v.version):
        state_label = model_pb2.ModelState.Name(version.state).removeprefix("MODEL_STATE_").lower()
        marker = "*" if version.version == listing.default_version else ""
        rows.append(
            [
                f"{marker}v{version.version}",
                version.framework,
                state_label,
                version.device,
                version.created_at,
                format_metrics(version.metrics),
            ]
        )
    print_table(["version", "framework", "state", "device", "created", "metrics"], rows)
    default = next((v for v in listing.versions if v.version == listing.default_version), None)
    if default is not None:
        for kind, specs in (("inputs", default.inputs), ("outputs", default.outputs)):
            described = ", ".join(
                f"{spec.name} {tensor_pb2.DataType.Name(spec.dtype).removeprefix('DATA_TYPE_')}{list(spec.shape)}"
                for spec in specs
            )
            print(f"{kind}: {described}")
        if default.class_names:
            print(f"classes: {', '.join(default.class_names)}")


def cmd_models_promote(client: Client, args: argparse.Namespace) -> None:
    model = client.models.promote(args.model, args.version)
    print(f"{model.name}: default is now v{model.default_version}")


def cmd_models_rollback(client: Client, args: argparse.Namespace) -> None:
    before = client.models.versions(args.model).default_version
    model = client.models.rollback(args.model)
    print(f"{model.name}: default rolled back from v{before} to v{model.default_version}")


def cmd_models_canary(client: Client, args: argparse.Namespace) -> None:
    model = client.models.canary(args.model, args.version, args.percent)
    if model.HasField("canary"):
        print(f"{model.name}: v{model.canary.model_version} takes {model.canary.percent}% of the default traffic, "
              f"v{model.default_version} the rest")  # fmt: skip
    else:
        print(f"{model.name}: no canary; v{model.default_version} takes all the default traffic")


def cmd_models_shadow(client: Client, args: argparse.Namespace) -> None:
    model = client.models.shadow(args.model, args.version, args.percent)
    if model.HasField("shadow"):
        print(f"{model.name}: v{model.shadow.model_version} gets copies of {model.shadow.percent}% of the default "
              f"traffic; v{model.default_version} answers")  # fmt: skip
    else:
        print(f"{model.name}: no shadow")


def cmd_datasets_upload(client: Client, args: argparse.Namespace) -> None:
    from tqdm import tqdm

    bars = []  # opened on the first chunk, so that a refused upload leaves only its error line

    def progress(sent: int, total: int) -> None:
        if not bars:
            bars.append(
                tqdm(total=total, unit="B", unit_scale=True, desc=f"uploading {args.file.name}", file=sys.stderr)
            )
        bars[0].update(sent - bars[0].n)

    try:
        dataset = client.datasets.upload(args.file, args.family, format=args.format, name=args.name, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if dataset.task:
        print(f"dataset {dataset.dataset_id}: {dataset.name}, {dataset.num_examples} examples, {dataset.task}")
    else:  # a trainer parses it, and records what it found, when a job first uses it
        stored = f"{dataset.size_bytes} bytes, sha256 {dataset.sha256[:12]}…"
        print(f"dataset {dataset.dataset_id}: {dataset.name}, {stored}; checked in full by the first job")
    if dataset.class_names:
        print(f"classes: {', '.join(dataset.class_names)}")


def cmd_datasets_list(client: Client, args: argparse.Namespace) -> None:
    listing = client.datasets.list(args.family)
    rows = [
        [d.dataset_id, d.name, family_name(d.family), d.num_examples if d.task else "-", d.task or "not parsed yet",
         d.size_bytes, d.created_at]  # fmt: skip
        for d in listing.datasets
    ]
    print_table(["dataset", "name", "family", "examples", "task", "bytes", "created"], rows)
    builtin = {}
    for dataset in listing.builtin_datasets:
        builtin.setdefault(family_name(dataset.family), []).append(dataset.name)
    print("\nbuilt in (train submit --dataset NAME):")
    for family, names in builtin.items():
        print(f"  {family}: {', '.join(names)}")


def cmd_datasets_show(client: Client, args: argparse.Namespace) -> None:
    dataset = client.datasets.get(args.dataset_id)
    fmt = training_pb2.DatasetFormat.Name(dataset.format).removeprefix("DATASET_FORMAT_").lower()
    rows = [
        ["name", dataset.name],
        ["family", family_name(dataset.family)],
        ["format", fmt],
        ["examples", dataset.num_examples],
        ["feature shape", list(dataset.feature_shape)],
        ["task", dataset.task or "not parsed yet (the first job that uses it checks it in full)"],
        ["classes", ", ".join(dataset.class_names)],
        ["bytes", dataset.size_bytes],
        ["sha256", dataset.sha256],
        ["created", dataset.created_at],
    ]
    print(dataset.dataset_id)
    print_table(["field", "value"], rows)


def cmd_train_submit(client: Client, args: argparse.Namespace) -> int:
    hidden = [int(size) for size in args.hidden.split(",") if size.strip()] if args.hidden else []
    job = client.training.submit(
        args.family,
        args.arch,
        dataset=args.dataset or "",
        dataset_id=args.dataset_id or "",
        output_model=args.output_model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        hidden_sizes=hidden,
        validation_split=args.validation_split,
        k_folds=args.k_folds,
        gate_metric=args.gate_metric,
        gate_min=args.gate_min,
        gate_max=args.gate_max,
        better_than_default=args.better_than_default,
        idempotency_key=args.idempotency_key,
        seed=args.seed,
        private=args.private,
        drop_columns=[c.strip() for c in args.drop_columns.split(",") if c.strip()],
        mask_columns=[c.strip() for c in args.mask_columns.split(",") if c.strip()],
        world_size=args.workers,
    )
    print(f"job {job.job_id} {state_name(job.state)}")
    if not args.watch:
        return 0
    return watch_job(client, job.job_id, args.plot, args.max_wait)


def cmd_train_watch(client: Client, args: argparse.Namespace) -> int:
    return watch_job(client, args.job_id, args.plot, args.max_wait)


def cmd_jobs_list(client: Client, args: argparse.Namespace) -> None:
    rows = [
        [
            job.job_id,
            family_name(job.spec.family),
            job.spec.output_model,
            state_name(job.state),
            f"{job.epoch}/{job.spec.epochs}" if job.spec.epochs else job.epoch,
            f"v{job.model_version}" if job.model_version else "",
            job.created_at,
        ]
        for job in client.training.list(args.family, args.limit)
    ]
    print_table(["job", "family", "model", "state", "epoch", "version", "created"], rows)


def cmd_jobs_cancel(client: Client, args: argparse.Namespace) -> None:
    job = client.training.cancel(args.job_id)
    print(f"job {job.job_id} {state_name(job.state)}")


def cmd_keys_rotate(client: Client, args: argparse.Namespace) -> int:
    """Exits 1 when a store reports errors: run it again once they are fixed, before retiring the old KEK."""
    stores = client.keys.rotate(args.to_kek_id, tenant=args.tenant)
    print_table(["store", "re-wrapped", "unchanged", "plain", "errors"],
                [[s.store, s.rewrapped, s.unchanged, s.plain, len(s.errors)] for s in stores])  # fmt: skip
    errors = [f"{s.store}: {error}" for s in stores for error in s.errors]
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print("maasctl: error: rotation is incomplete; keep the old KEK and run it again", file=sys.stderr)
        return 1
    print(f"every data key is wrapped by {args.to_kek_id!r} where it should be; the old KEK may be retired")
    return 0


def cmd_keys_list(client: Client, args: argparse.Namespace) -> None:
    rows = []
    for store in client.keys.list():
        used = ", ".join(f"{kek}: {count}" for kek, count in sorted(store.data_keys_by_kek.items())) or "-"
        tenants = ", ".join(f"{t}: {k}" for t, k in sorted(store.tenant_kek_ids.items()))
        rows.append([store.store, "on" if store.encrypted else "off", store.active_kek_id or "-", used,
                     store.plain, ", ".join(store.available_kek_ids) or "-", tenants or "-"])  # fmt: skip
        for error in store.errors:
            print(f"{store.store}: {error}", file=sys.stderr)
    print_table(["store", "encryption", "active KEK", "data keys by KEK", "plain", "KEKs available", "tenant KEKs"],
                rows)  # fmt: skip


# --- training progress ------------------------------------------------------------------------


def watch_job(client: Client, job_id: str, plot: Path | None, max_wait: float) -> int:
    """Shows a live progress bar until the job ends, then its metrics; exit 1 unless it succeeded."""
    from tqdm import tqdm

    history: list[training_pb2.JobEvent] = []
    bar = None
    state = None
    try:
        for event in client.training.watch(job_id, timeout=max_wait):
            if event.epochs and bar is None:
                bar = tqdm(total=event.epochs, unit="epoch", desc=f"job {job_id[:8]}", file=sys.stderr)
            if event.state != state:
                state = event.state
                message = f" ({event.message})" if event.message else ""
                (bar.write if bar else print)(f"{state_name(state)}{message}", file=sys.stderr)
            if event.epoch and bar is not None:
                history.append(event)
                postfix = {"loss": f"{event.train_loss:.4f}"}
                postfix.update({k: f"{v:.4f}" for k, v in sorted(event.validation_metrics.items())})
                bar.set_postfix(postfix, refresh=False)
                bar.update(event.epoch - bar.n)
    finally:
        if bar is not None:
            bar.close()
    job = client.training.get(job_id)
    print(f"job {job.job_id} {state_name(job.state)}", end="")
    print(f": {job.spec.output_model} v{job.model_version}" if job.model_version else "", end="")
    print(f" ({'promoted' if job.promoted else 'not promoted'}: {job.gate_result})" if job.gate_result else "")
    if job.metrics:
        print_table(["metric", "value"], [[name, f"{value:.4f}"] for name, value in sorted(job.metrics.items())])
    if plot is not None:
        if history:
            save_curves(history, plot, f"{job.spec.output_model or job_id} ({job.spec.architecture})")
            print(f"curves saved to {plot}")
        else:
            print("no epochs to plot", file=sys.stderr)
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        print(f"maasctl: error: job {job.job_id} {state_name(job.state)}: {job.error}", file=sys.stderr)
        return 1
    return 0


def save_curves(history: Sequence[training_pb2.JobEvent], path: Path, title: str) -> None:
    """Training loss and each validation metric by epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    by_epoch = {event.epoch: event for event in history}  # a retried job replays epochs: keep the last
    epochs = sorted(by_epoch)
    metrics = sorted({name for event in by_epoch.values() for name in event.validation_metrics})
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [by_epoch[e].train_loss for e in epochs], marker="o", label="train loss")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="training loss")
    loss_axis.legend()
    for name in metrics:
        points = [(e, by_epoch[e].validation_metrics[name]) for e in epochs if name in by_epoch[e].validation_metrics]
        metric_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    metric_axis.set(xlabel="epoch", title="validation metrics")
    if metrics:
        metric_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


# --- input and output -------------------------------------------------------------------------


def read_inputs(specs: Sequence[str], dtype: np.dtype) -> dict[str, np.ndarray]:
    """--input values by name ("" when unnamed). A .npz file gives all of its arrays by name."""
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # numpy warns on an empty CSV: that is bad input here
                read_input(spec, dtype, inputs)
        except UsageError:
            raise
        except (ValueError, KeyError, EOFError, TypeError, Warning) as error:
            raise UsageError(f"--input {spec!r}: {error}") from None
    return inputs


def read_input(spec: str, dtype: np.dtype, inputs: dict[str, np.ndarray]) -> None:
    """One --input: NAME=VALUE or VALUE, where VALUE is a JSON array or a file."""
    name, _, value = spec.partition("=") if "=" in spec and not spec.lstrip().startswith("[") else ("", "", spec)
    value = value.strip()
    if value.startswith("["):
        try:
            inputs[name] = np.asarray(json.loads(value), dtype=dtype)
        except json.JSONDecodeError as error:
            raise UsageError(f"--input {spec!r}: not a JSON array of numbers ({error})") from None
        return
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"--input {spec!r}: no such file, and not a JSON array")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path) as archive:
            if name and name not in archive.files:
                raise UsageError(f"--input {spec!r}: {path.name} has no array {name!r}; it has {archive.files}")
            inputs.update({key: archive[key] for key in archive.files} if not name else {name: archive[name]})
    elif suffix == ".npy":
        inputs[name] = np.load(path)
    elif suffix == ".csv":
        inputs[name] = np.loadtxt(path, delimiter=",", dtype=dtype, ndmin=2)
    elif suffix == ".json":
        inputs[name] = np.asarray(json.loads(path.read_text()), dtype=dtype)
    else:
        raise UsageError(f"--input {spec!r}: expected a .npy, .npz, .csv or .json file")


def seconds(text: str) -> float:
    """argparse type: a finite, positive number of seconds."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def numeric_dtype(text: str) -> np.dtype:
    """argparse type: a numpy dtype maas tensors carry (float32, int64, ...)."""
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}") from None
    if dtype.kind not in "biuf":
        raise argparse.ArgumentTypeError(f"expected a numeric dtype such as float32 or int64, got {text}")
    return dtype


def read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file:
        texts += [line.strip() for line in args.file.read_text().splitlines() if line.strip()]
    if not texts:
        raise UsageError("give texts as arguments or with --file")
    return texts


def read_graph(path: Path) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".npz":
        with np.load(path) as archive:
            raw = {key: archive[key] for key in archive.files}
    elif path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UsageError(f"--graph {path}: not JSON ({error})") from None
    else:
        raise UsageError(f"--graph {path}: expected a .json or .npz file")
    if not isinstance(raw, dict):
        raise UsageError(f"--graph {path}: expected an object with node_features and edge_index")
    missing = [key for key in ("node_features", "edge_index") if key not in raw]
    if missing:
        raise UsageError(f"--graph {path}: missing {', '.join(missing)}; it needs node_features and edge_index")
    graph = {
        "node_features": np.asarray(raw["node_features"], np.float32),
        "edge_index": np.asarray(raw["edge_index"], np.int64),
    }
    if raw.get("edge_weight") is not None:
        graph["edge_weight"] = np.asarray(raw["edge_weight"], np.float32)
    return graph


def show_prediction(result: Prediction, args: argparse.Namespace, extra: dict | None = None) -> None:
    outputs = dict(result.outputs)
    if extra:
        outputs.update(extra)
    saved = None
    if args.save:
        if args.save.suffix == ".npy":
            if len(outputs) != 1:
                raise UsageError(f"--save {args.save}: the model gave {len(outputs)} outputs; save them to a .npz file")
            np.save(args.save, next(iter(outputs.values())))
            saved = args.save
        else:
            saved = args.save if args.save.suffix == ".npz" else Path(f"{args.save}.npz")  # as np.savez names it
            np.savez(saved, **outputs)
    if args.json:
        payload = {"model": result.model, "version": result.version}
        payload.update({name: array.tolist() for name, array in outputs.items()})
        if result.labels:
            payload["labels"] = result.labels
        print(json.dumps(payload))
        return
    print(f"{result.model} v{result.version}")
    if result.labels:
        print(f"labels: {result.labels}")
    for name, array in outputs.items():
        body = np.array2string(array, precision=4, threshold=40, edgeitems=3)
        print(f"{name} {array.dtype}{list(array.shape)}:\n{body}")
    if saved:
        print(f"saved to {saved}")


def format_metrics(metrics) -> str:
    return ", ".join(f"{name}={value:.3f}" for name, value in sorted(metrics.items()))


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    sys.exit(main())
