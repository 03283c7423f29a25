"""NLP inference, independent of gRPC: tokenise, embed with the ONNX encoder, classify with a head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from services.nlp.explain import TextExplanation, explain_text
from shared.batching import split_rows
from shared.errors import InvalidArgumentError
from shared.explanations import ExplanationRunner
from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Artifacts, Manifest, ModelStore
from shared.onnx_session import OnnxConfig, OnnxSession

# Texts per ONNX call inside a batch: consecutive texts in length order share one padded shape.
LENGTH_GROUP_SIZE = 16


# Outputs the predictors add for the runtime, which takes them out before a response is built.
TOKEN_COUNT = "token_count"
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TextEncoder:
    """Sentence embeddings: a tokenizer plus an ONNX graph that pools and L2-normalises.

    Texts are tokenised whole, so each one's token count is known; the few over `max_tokens` are
    tokenised again with truncation, which keeps the special tokens at both ends."""

    def __init__(self, manifest: Manifest, artifacts: Artifacts, config: OnnxConfig, max_length: int) -> None:
        spec = artifacts.read(manifest.config["tokenizer_file"]).decode("utf-8")
        self.max_tokens = min(max_length, manifest.config["max_sequence_length"])
        self.tokenizer = Tokenizer.from_str(spec)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()  # each length group is padded to its own longest text
        self.truncating = Tokenizer.from_str(spec)
        self.truncating.enable_truncation(self.max_tokens)
        self.truncating.no_padding()
        self.session = OnnxSession(artifacts.read(manifest.config["onnx_file"]), config)
        self.device = self.session.device

    def warm_up(self, max_batch_size: int = 1) -> None:
        self.embed(["warm up"])

    def encode(self, texts: list[str]) -> tuple[list, np.ndarray]:
        """Encodings held to the token limit, and each text's whole token count."""
        encodings = self.tokenizer.encode_batch(texts)
        counts = np.array([len(encoding.ids) for encoding in encodings], dtype=np.int32)
        long = [i for i, count in enumerate(counts) if count > self.max_tokens]
        if long:
            for i, encoding in zip(long, self.truncating.encode_batch([texts[i] for i in long]), strict=True):
                encodings[i] = encoding
        return encodings, counts

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        return np.array([len(encoding.ids) for encoding in self.tokenizer.encode_batch(texts)], dtype=np.int32)

    def run_encoder(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embeddings of padded token rows; a token whose mask is 0 is neither attended to nor pooled."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}
        return self.session.run(feeds)["embedding"]

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeds texts in groups of similar token length, so padding stays small; keeps the order.
        Returns the embeddings and each text's whole token count."""
        encodings, counts = self.encode(texts)
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
        return embeddings, counts

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        embeddings, counts = self.embed_counted(texts)
        return {"embedding": embeddings, TOKEN_COUNT: counts}

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
        embeddings, counts = self.encoder.embed_counted(texts)
        return {**self.head.run({"embedding": embeddings}), TOKEN_COUNT: counts}

    def classify(self, embeddings: np.ndarray) -> np.ndarray:
        return self.head.run({"embedding": embeddings})["probabilities"]

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


CUT, ERROR = "cut", "error"


@dataclass
class TextPrediction(Prediction):
    labels: list[str]
    token_counts: np.ndarray
    max_tokens: int


@dataclass
class Similarity:
    manifest: Manifest
    scores: np.ndarray
    ranking: np.ndarray
    token_counts: np.ndarray
    max_tokens: int
    label_probabilities: np.ndarray | None = None  # with a rerank label: per candidate
    reranking: np.ndarray | None = None


class NlpRuntime:
    def __init__(self, repository: ModelRepository, max_batch_texts: int,
                 explainer: ExplanationRunner | None = None) -> None:  # fmt: skip
        self.repository = repository
        self.max_batch_texts = max_batch_texts
        self.explainer = explainer

    def check_texts(self, texts: list[str], field: str = "texts") -> None:
        if not texts:
            raise InvalidArgumentError(f"{field}: must hold at least one text, got an empty list")
        if len(texts) > self.max_batch_texts:
            raise InvalidArgumentError(f"{field}: at most {self.max_batch_texts} texts per request, got {len(texts)}")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgumentError(f"{field}[{i}]: empty text; every text needs at least one word")

    @staticmethod
    def check_token_limit(encoder: TextEncoder, texts: list[str], fields: list[str]) -> None:
        """Truncation ERROR: a text over the limit fails the request before it is batched."""
        for field, count in zip(fields, encoder.count_tokens(texts), strict=True):
            if count > encoder.max_tokens:
                raise InvalidArgumentError(
                    f"{field}: {count} tokens, over the model's limit of {encoder.max_tokens}, and truncation is "
                    "ERROR; shorten the text or ask for TRUNCATION_CUT"
                )

    async def predict(self, name: str, version: int, texts: list[str], deadline: float | None = None,
                      truncation: str = CUT) -> TextPrediction:  # fmt: skip
        entry = self.repository.resolve(name, version)
        self.check_texts(texts)
        encoder = _encoder_of(entry.predictor)
        if truncation == ERROR:
            self.check_token_limit(encoder, texts, [f"texts[{i}]" for i in range(len(texts))])
        outputs = dict(await entry.batcher.submit(texts, deadline))
        counts = outputs.pop(TOKEN_COUNT)
        labels = []
        names = entry.manifest.class_names
        if "label" in outputs and names:
            chosen = outputs["label"]
            if chosen.ndim == 2:  # multi-label: every label a text has, comma-separated
                labels = [",".join(name for name, on in zip(names, row, strict=True) if on) for row in chosen]
            else:
                labels = [names[i] for i in chosen]
        return TextPrediction(entry.manifest, outputs, labels, counts, encoder.max_tokens)

    async def similarity(self, name: str, version: int, query: str, candidates: list[str],
                         deadline: float | None = None, truncation: str = CUT,
                         rerank_label: str = "") -> Similarity:  # fmt: skip
        entry = self.repository.resolve(name, version)
        label = self.check_rerank_label(entry, rerank_label) if rerank_label else None
        if not query.strip():
            raise InvalidArgumentError("query: empty; send the text to compare the candidates with")
        self.check_texts(candidates, "candidates")
        if len(candidates) + 1 > self.max_batch_texts:
            raise InvalidArgumentError(f"candidates: at most {self.max_batch_texts - 1} per request (with the query, "
                                       f"{self.max_batch_texts} texts), got {len(candidates)}")  # fmt: skip
        texts = [query, *candidates]
        encoder_entry = entry
        if "encoder" in entry.manifest.config:  # a classifier: compare with the encoder it was trained on
            base = entry.manifest.config["encoder"]
            encoder_entry = self.repository.resolve(base["name"], base["version"])
        encoder = _encoder_of(encoder_entry.predictor)
        if truncation == ERROR:
            self.check_token_limit(encoder, texts, ["query", *(f"candidates[{i}]" for i in range(len(candidates)))])
        outputs = await encoder_entry.batcher.submit(texts, deadline)
        embeddings = outputs["embedding"]
        scores = embeddings[1:] @ embeddings[0]  # embeddings are L2-normalised: the dot product is the cosine
        ranking = np.argsort(-scores, kind="stable")
        result = Similarity(entry.manifest, scores, ranking, outputs[TOKEN_COUNT], encoder.max_tokens)
        if label is not None:
            # The head runs on the candidates' embeddings already computed: the encoder runs once.
            probabilities = await self.repository.run(entry.predictor.classify, embeddings[1:])
            result.label_probabilities = probabilities[:, label]
            result.reranking = ranking[np.argsort(-result.label_probabilities[ranking], kind="stable")]
        return result

    @staticmethod
    def check_rerank_label(entry, label: str) -> int:
        """The column of `label` in the classifier's probabilities; INVALID_ARGUMENT when it has none."""
        names = entry.manifest.class_names
        if not isinstance(entry.predictor, TextClassifier) or not names:
            raise InvalidArgumentError(f"rerank_label: {entry.manifest.name!r} is an embedding model; reranking "
                                       "needs a classifier, a model with class names")  # fmt: skip
        if label not in names:
            raise InvalidArgumentError(f"rerank_label: {label!r} is not a label of {entry.manifest.name!r}; "
                                       f"use one of {names}")  # fmt: skip
        return names.index(label)

    async def explain(
        self, name: str, version: int, text: str, method: str, target: int | None, compare_text: str,
        deadline: float | None = None, validate_only: bool = False,
    ) -> tuple[Manifest, TextExplanation | None]:  # fmt: skip
        entry = self.repository.resolve(name, version)
        assert self.explainer is not None
        explanation = await self.explainer.run(
            explain_text, entry.predictor, entry.manifest.class_names, text, method, target, compare_text,
            validate_only, deadline=deadline,
        )  # fmt: skip
        return entry.manifest, explanation


def _encoder_of(predictor) -> TextEncoder:
    return predictor.encoder if isinstance(predictor, TextClassifier) else predictor
