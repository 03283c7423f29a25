"""Training jobs for text classifiers: a head on the default MiniLM encoder's embeddings, exported to ONNX.

Multi-class heads (one label per text: softmax, cross-entropy) and multi-label heads (any number of
labels per text: one sigmoid each, binary cross-entropy) are evaluated with macro-F1 on held-out texts.
"""

from __future__ import annotations

import torch

from services.nlp.defaults import EMBEDDING_DIM, MINILM, TEXT_INPUT
from services.nlp.runtime import TextEncoder
from shared.data_parallel import NetworkRecipe, ShardedFit
from shared.job_splits import TEST_SHARE, fit_and_evaluate, split_indices
from shared.onnx_session import OnnxConfig
from shared.training import (
    MLP,
    MULTILABEL,
    ExportableClassifier,
    ExportableMultiLabel,
    export_onnx_bytes,
    loss_and_targets,
    make_optimizer,
    task_metrics,
    train_minibatch_epoch,
)
from shared.training_worker import JobContext, JobResult


def run_job(context: JobContext) -> JobResult:
    spec = context.spec
    data = context.dataset()
    context.check_size([EMBEDDING_DIM], len(data.class_names), len(data.texts))  # before embedding them all
    torch.manual_seed(spec["seed"])
    encoder_version = context.store.default_version(MINILM)
    encoder_manifest = context.store.manifest(MINILM, encoder_version)
    encoder = TextEncoder(encoder_manifest, context.store.artifacts(encoder_manifest), OnnxConfig(device="cpu"), 128)
    context.message(f"embedding {len(data.texts)} texts with {MINILM} v{encoder_version}")
    device = context.device
    x_all = torch.as_tensor(encoder.embed(data.texts)).to(device)
    task = data.task
    loss_fn, y_all = loss_and_targets(task, data.labels)
    y_all = y_all.to(device)
    classes = len(data.class_names)
    strata = data.labels if task == "classification" else None  # label sets are not stratified
    rest, test = split_indices(len(data.texts), strata, TEST_SHARE, spec["seed"])
    hidden = spec["hidden_sizes"] if spec["architecture"] == "mlp" else []

    head = {"in_features": EMBEDDING_DIM, "hidden": hidden, "out_features": classes, "dropout": 0.1 if hidden else 0.0}

    def fresh():
        net = MLP(**head).to(device)
        return net, make_optimizer(spec["optimizer"], net.parameters(), spec["learning_rate"])

    def epoch_fn(net, opt, idx):
        return lambda epoch: train_minibatch_epoch(
            net, opt, loss_fn, x_all[idx], y_all[idx], spec["batch_size"], spec["seed"], epoch
        )

    def evaluate(net, idx) -> dict[str, float]:
        with torch.no_grad():
            return task_metrics(task, data.labels[idx], net(x_all[idx]).cpu().numpy())

    # Data-parallel workers build the same head and train on the embeddings.
    sharded = ShardedFit(NetworkRecipe("shared.training:MLP", head), x_all, y_all, data.labels, task)
    net, metrics = fit_and_evaluate(context, len(data.texts), strata, rest, test, fresh, epoch_fn, evaluate, sharded)
    exportable = ExportableMultiLabel(net.cpu()) if task == MULTILABEL else ExportableClassifier(net.cpu())
    label_shape = [-1, classes] if task == MULTILABEL else [-1]
    # In memory: the head reaches disk only sealed by the model store.
    onnx_bytes = export_onnx_bytes(
        exportable,
        (torch.zeros(1, EMBEDDING_DIM),),
        input_names=["embedding"],
        output_names=["probabilities", "label"],
        dynamic_axes={"embedding": {0: "batch"}, "probabilities": {0: "batch"}, "label": {0: "batch"}},
    )
    record = {
        "family": "nlp",
        "framework": "onnx",
        "inputs": [TEXT_INPUT],
        "outputs": [
            {"name": "probabilities", "dtype": "FP32", "shape": [-1, classes]},
            {"name": "label", "dtype": "INT64", "shape": label_shape},
        ],
        "metrics": metrics,
        "class_names": data.class_names,
        "description": f"{spec['architecture']} head on {MINILM} v{encoder_version}, "
        f"trained on {context.dataset_name()}",
        "config": {
            "kind": "classifier",
            "task": task,
            "onnx_file": "head.onnx",
            "encoder": {"name": MINILM, "version": encoder_version},
            "job": context.job_id,
            "spec": spec,
        },  # fmt: skip
    }
    context.message("evaluated; writing the version", state="EVALUATING")
    return context.publish(record, {"head.onnx": onnx_bytes}, task)
