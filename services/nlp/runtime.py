"""NLP inference, independent of gRPC: tokenise, embed with the ONNX encoder, classify with a head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from shared.errors import InvalidArgumentError
from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Manifest, ModelStore
from shared.onnx_session import OnnxSession


class TextEncoder:
    """Sentence embeddings: a tokenizer plus an ONNX graph that pools and L2-normalises."""

    def __init__(self, manifest: Manifest, directory: Path, device: str, max_length: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(directory / manifest.config["tokenizer_file"]))
        self.tokenizer.enable_truncation(min(max_length, manifest.config["max_sequence_length"]))
        self.tokenizer.enable_padding()  # to the longest text in the batch
        self.session = OnnxSession(directory / manifest.config["onnx_file"], device)
        self.device = self.session.device

    def warm_up(self) -> None:
        self.embed(["warm up"])

    def embed(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        return self.session.run(feeds)["embedding"]

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"embedding": self.embed(texts)}


class TextClassifier:
    """A classification head (ONNX) on top of a stored encoder version's embeddings."""

    def __init__(self, manifest: Manifest, directory: Path, encoder: TextEncoder, device: str) -> None:
        self.encoder = encoder
        self.head = OnnxSession(directory / manifest.config["onnx_file"], device)
        self.device = self.head.device

    def warm_up(self) -> None:
        self.predict(["warm up"])

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.head.run({"embedding": self.encoder.embed(texts)})


def nlp_loader(store: ModelStore, device: str, max_length: int) -> Callable[[Manifest, Path], object]:
    """Loads encoders and classifiers; a classifier shares the loaded encoder version it names."""
    encoders: dict[tuple[str, int], TextEncoder] = {}

    def encoder_for(name: str, version: int) -> TextEncoder:
        if (name, version) not in encoders:
            manifest = store.manifest(name, version)
            encoders[(name, version)] = TextEncoder(manifest, store.verify(manifest), device, max_length)
        return encoders[(name, version)]

    def load(manifest: Manifest, directory: Path):
        if manifest.config["kind"] == "embedding":
            return encoder_for(manifest.name, manifest.version)
        base = manifest.config["encoder"]
        return TextClassifier(manifest, directory, encoder_for(base["name"], base["version"]), device)

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

    async def predict(self, name: str, version: int, texts: list[str]) -> TextPrediction:
        entry = self.repository.resolve(name, version)
        self.check_texts(texts)
        outputs = await self.repository.run(entry.predictor.predict, texts)
        labels = []
        if "label" in outputs and entry.manifest.class_names:
            labels = [entry.manifest.class_names[i] for i in outputs["label"]]
        return TextPrediction(entry.manifest, outputs, labels)
