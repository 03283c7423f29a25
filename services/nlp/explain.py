"""Per-token explanations of text models: occlusion on the ONNX encoder, with Captum's FeatureAblation.

Each token of the text is removed in turn (its attention mask set to 0, so the encoder neither
attends to it nor pools it) and the explained score's drop is the token's attribution. The score
is a classifier's probability of its label, or an embedding model's cosine similarity to a
second text. [CLS] and [SEP] are never removed. Tokens map back to character spans of the text
through the tokenizer's offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import FeatureAblation

from shared.errors import InvalidArgumentError
from shared.explanations import check_method, checked

OCCLUSION = "occlusion"
METHODS = (OCCLUSION,)
# Occluded copies of the text per encoder run; a cancelled explanation stops within one such run.
OCCLUSIONS_PER_RUN = 32


@dataclass
class TokenScore:
    token: str
    attribution: float
    start: int
    end: int


@dataclass
class TextExplanation:
    method: str
    tokens: list[TokenScore]
    target: int
    label: str
    score: float
    baseline_score: float
    probabilities: np.ndarray | None


def check_token_limit(field: str, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidArgumentError(
            f"{field}: {count} tokens, over the model's limit of {limit}; explanations never truncate, "
            "so shorten the text"
        )


def explain_text(predictor, class_names: list[str], text: str, method: str, target: int | None,
                 compare_text: str, validate_only: bool = False) -> TextExplanation | None:  # fmt: skip
    """`predictor` is a loaded services.nlp.runtime TextEncoder or TextClassifier."""
    method = method or OCCLUSION
    check_method(method, METHODS)
    if not text.strip():
        raise InvalidArgumentError("text: empty; send the text to explain")
    classifier = hasattr(predictor, "classify")
    encoder = predictor.encoder if classifier else predictor
    if classifier and compare_text:
        raise InvalidArgumentError("compare_text: only for embedding models; a classifier's label is explained")
    if not classifier and not compare_text.strip():
        raise InvalidArgumentError("compare_text: an embedding model explains the similarity of text to "
                                   "compare_text; send both")  # fmt: skip
    if classifier and target is not None and not 0 <= target < len(class_names):
        raise InvalidArgumentError(f"target: must be 0..{len(class_names) - 1} (one of {class_names}), got {target}")
    encoding = encoder.tokenizer.encode(text)
    check_token_limit("text", len(encoding.ids), encoder.max_tokens)
    if compare_text:
        check_token_limit("compare_text", int(encoder.count_tokens([compare_text])[0]), encoder.max_tokens)
    if validate_only:
        return None

    ids = np.array([encoding.ids], dtype=np.int64)
    special = np.array(encoding.special_tokens_mask, dtype=bool)
    content = np.flatnonzero(~special)
    other = encoder.embed([compare_text])[0] if compare_text else None
    probabilities = None

    @checked
    def scores(keep: torch.Tensor) -> torch.Tensor:
        """The explained score for each row of `keep` (1 keeps a content token, 0 removes it)."""
        rows = keep.shape[0]
        mask = np.ones((rows, ids.shape[1]), dtype=np.int64)
        mask[:, content] = keep.detach().numpy() > 0.5
        embeddings = encoder.run_encoder(np.repeat(ids, rows, axis=0), mask)
        if classifier:
            return torch.from_numpy(np.asarray(predictor.classify(embeddings), dtype=np.float32))
        return torch.from_numpy((embeddings @ other)[:, None].astype(np.float32))

    full = torch.ones(1, len(content))
    with torch.no_grad():
        explained = scores(full)[0].numpy()
    if classifier:
        probabilities = explained
        chosen = int(np.argmax(explained)) if target is None else int(target)
    else:
        chosen = 0
    per_run = min(OCCLUSIONS_PER_RUN, max(1, len(content)))
    attributions = (
        FeatureAblation(scores).attribute(full, baselines=0.0, target=chosen, perturbations_per_eval=per_run)[0].numpy()
    )
    with torch.no_grad():
        baseline_score = float(scores(torch.zeros(1, len(content)))[0, chosen])
    tokens = [
        TokenScore(encoding.tokens[i], float(attr), *encoding.offsets[i])
        for i, attr in zip(content, attributions, strict=True)
    ]
    return TextExplanation(
        method=method,
        tokens=tokens,
        target=chosen,
        label=class_names[chosen] if classifier and class_names else "",
        score=float(explained[chosen]),
        baseline_score=baseline_score,
        probabilities=probabilities,
    )
