"""NLP inference, independent of gRPC: tokenise, embed with the ONNX encoder, classify with a head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from shared.batching import split_rows
from shared.errors import InvalidArgumentError
from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Artifacts, Manifest, ModelStore
from shared.onnx_session import OnnxConfig, OnnxSession

# Texts per ONNX call inside a batch: consecutive texts in length order share one padded shape.
LENGTH_GROUP_SIZE = 16


class TextEncoder:
    """Sentence embeddings: a tokenizer plus an ONNX graph that pools and L2-normalises."""

    def __init__(self, manifest: Manifest, artifacts: Artifacts, config: OnnxConfig, max_length: int) -> None:
        self.tokenizer = Tokenizer.from_str(artifacts.read(manifest.config["tokenizer_file"]).decode("utf-8"))
        self.tokenizer.enable_truncation(min(max_length, manifest.config["max_sequence_length"]))
        self.tokenizer.no_padding()  # each length group is padded to its own longest text
        self.session = OnnxSession(artifacts.read(manifest.config["onnx_file"]), config)
        self.device = self.session.device

    def warm_up(self, max_batch_size: int = 1) -> None:
        self.embed(["warm up"])

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeds texts in groups of similar token length, so padding stays small; keeps the order."""
        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        embeddings: np.ndarray | None = None
        for start in range(0, len(order), LENGTH_GROUP_SIZE):
            group = order[start : start + LENGTH_GROUP_SIZE]
            width = max(len(encodings[i].ids) for i in group)
            feeds = {
                name: np.zeros((len(group), width), dtype=np.int64)
                for name in ("input_ids", "attention_mask", "token_type_ids")
            }
            for row, i in enumerate(group):
                encoding, length = encodings[i], len(encodings[i].ids)
                feeds["input_ids"][row, :length] = encoding.ids
                feeds["attention_mask"][row, :length] = encoding.attention_mask
                feeds["token_type_ids"][row, :length] = encoding.type_ids
            vectors = self.session.run(feeds)["embedding"]
            if embeddings is None:
                embeddings = np.empty((len(texts), vectors.shape[1]), dtype=vectors.dtype)
            embeddings[group] = vectors
        return embeddings

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"embedding": self.embed(texts)}

    def item_size(self, texts: list[str]) -> int:
        return len(texts)

    def run_batch(self, items: list[list[str]]) -> list[dict[str, np.ndarray]]:
        return split_rows(self.predict([text for texts in items for text in texts]), [len(t) for t in items])


class TextClassifier:
    """A classification head (ONNX) on top of a stored encoder version's embeddings."""

    def __init__(self, manifest: Manifest, artifacts: Artifacts, encoder: TextEncoder, config: OnnxConfig) -> None:
        self.encoder = encoder
        self.head = OnnxSession(artifacts.read(manifest.config["onnx_file"]), config)
        self.device = self.head.device

    def warm_up(self, max_batch_size: int = 1) -> None:
        self.predict(["warm up"])

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.head.run({"embedding": self.encoder.embed(texts)})

    def item_size(self, texts: list[str]) -> int:
        return len(texts)

    def run_batch(self, items: list[list[str]]) -> list[dict[str, np.ndarray]]:
        return split_rows(self.predict([text for texts in items for text in texts]), [len(t) for t in items])


def nlp_loader(store: ModelStore, config: OnnxConfig, max_length: int) -> Callable[[Manifest, Artifacts], object]:
    """Loads encoders and classifiers; a classifier shares the loaded encoder version it names."""
    encoders: dict[tuple[str, int], TextEncoder] = {}

    def encoder_for(name: str, version: int) -> TextEncoder:
        if (name, version) not in encoders:
            manifest = store.manifest(name, version)
            encoders[(name, version)] = TextEncoder(manifest, store.artifacts(manifest), config, max_length)
        return encoders[(name, version)]

    def load(manifest: Manifest, artifacts: Artifacts):
        if manifest.config["kind"] == "embedding":
            return encoder_for(manifest.name, manifest.version)
        base = manifest.config["encoder"]
        return TextClassifier(manifest, artifacts, encoder_for(base["name"], base["version"]), config)

    return load


@dataclass
class TextPrediction(Prediction):
    labels: list[str]


class NlpRuntime:
    def __init__(self, repository: ModelRepository, max_batch_texts: int) -> None:
        self.repository = repository
        self.max_batch_texts = max_batch_texts

    def check_texts(self, texts: list[str]) -> None:
        if not texts:
            raise InvalidArgumentError("texts: must hold at least one text, got an empty list")
        if len(texts) > self.max_batch_texts:
            raise InvalidArgumentError(f"texts: at most {self.max_batch_texts} texts per request, got {len(texts)}")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgumentError(f"texts[{i}]: empty text; every text needs at least one word")

    async def predict(self, name: str, version: int, texts: list[str], deadline: float | None = None) -> TextPrediction:
        entry = self.repository.resolve(name, version)
        self.check_texts(texts)
        outputs = await entry.batcher.submit(texts, deadline)
        labels = []
        if "label" in outputs and entry.manifest.class_names:
            labels = [entry.manifest.class_names[i] for i in outputs["label"]]
        return TextPrediction(entry.manifest, outputs, labels)
