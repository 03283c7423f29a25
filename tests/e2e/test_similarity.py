"""NLP beyond embeddings: Similarity ranks candidates by cosine, and token limits are explicit."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from shared.tensors import to_numpy
from tests.tolerance import served

LONG = "the quick brown fox jumps over the lazy dog " * 40  # 360 words: far past 128 tokens


@pytest.fixture(scope="module")
def nlp(gateway_channel):
    return nlp_pb2_grpc.NlpServiceStub(gateway_channel)


@pytest.mark.parametrize("model", ["minilm-l6-v2", "sentiment"])
def test_a_paraphrase_ranks_above_unrelated_sentences(nlp, model):
    reply = nlp.Similarity(
        nlp_pb2.SimilarityRequest(
            model_name=model,  # a classifier compares with the encoder it was trained on
            query="How do I reset my password?",
            candidates=[
                "The weather in Lisbon is sunny today.",
                "What are the steps to change my login password?",
                "Stock markets fell sharply on Monday.",
            ],
        ),
        timeout=30,
    )
    assert reply.ranking[0] == 1
    assert reply.scores[1] > 0.5 and max(reply.scores[0], reply.scores[2]) < 0.3
    assert list(reply.ranking) == sorted(range(3), key=lambda i: -reply.scores[i])
    assert reply.query_tokens.tokens == 9 and not reply.query_tokens.truncated  # [CLS], 6 words, "?", [SEP]
    assert reply.model_name == model


def test_similarity_scores_are_the_cosine_of_the_embeddings(nlp):
    texts = ["a red car", "a crimson automobile", "quantum chromodynamics"]
    embedded = nlp.Predict(nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=texts), timeout=30)
    vectors = to_numpy(embedded.outputs["embedding"], "embedding")
    reply = nlp.Similarity(
        nlp_pb2.SimilarityRequest(model_name="minilm-l6-v2", query=texts[0], candidates=texts[1:]), timeout=30
    )
    np.testing.assert_allclose(reply.scores, vectors[1:] @ vectors[0], **served())


def test_truncation_is_reported(nlp):
    reply = nlp.Predict(nlp_pb2.PredictRequest(model_name="sentiment", texts=["short and sweet", LONG]), timeout=30)
    assert reply.max_tokens == 128
    short, long = reply.token_counts
    assert (short.tokens, short.truncated) == (5, False)
    assert long.tokens == 362 and long.truncated
    assert len(reply.labels) == 2  # the long text was cut, and still classified


def test_a_request_can_ask_for_an_error_instead_of_truncation(nlp):
    for call, request in (
        (nlp.Predict, nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=["fine", LONG],
                                             truncation=nlp_pb2.TRUNCATION_ERROR)),
        (nlp.Similarity, nlp_pb2.SimilarityRequest(model_name="minilm-l6-v2", query="fine", candidates=["ok", LONG],
                                                   truncation=nlp_pb2.TRUNCATION_ERROR)),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "362 tokens, over the model's limit of 128" in caught.value.details()
        assert ("texts[1]" if call is nlp.Predict else "candidates[1]") in caught.value.details()
    fine = nlp.Predict(
        nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=["fine"], truncation=nlp_pb2.TRUNCATION_ERROR),
        timeout=30,
    )
    assert not fine.token_counts[0].truncated


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (nlp_pb2.SimilarityRequest(model_name="minilm-l6-v2", query="q"), "candidates: must hold at least one text"),
        (nlp_pb2.SimilarityRequest(model_name="minilm-l6-v2", query=" ", candidates=["a"]), "query: empty"),
        (nlp_pb2.SimilarityRequest(model_name="minilm-l6-v2", query="q", candidates=["a", ""]), "candidates[1]: empty"),
    ],
)
def test_bad_similarity_requests(nlp, request_, fragment):
    with pytest.raises(grpc.RpcError) as caught:
        nlp.Similarity(request_, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


def test_a_classifier_head_reranks_the_candidates_by_its_label(nlp):
    candidates = [
        "The room was dirty and the staff were rude.",
        "A lovely stay with a kind and helpful host.",
        "Terrible noise all night, we could not sleep.",
        "Wonderful breakfast and a spotless, quiet room.",
    ]
    request = nlp_pb2.SimilarityRequest(model_name="sentiment", query="How was the hotel?", candidates=candidates,
                                        rerank_label="positive")  # fmt: skip
    reply = nlp.Similarity(request, timeout=30)
    probabilities = np.array(reply.label_probabilities)
    assert set(reply.reranking[:2]) == {1, 3}  # the positive reviews first, whatever their cosine
    assert list(reply.reranking) == sorted(range(4), key=lambda i: -probabilities[i])
    assert probabilities[[1, 3]].min() > 0.5 > probabilities[[0, 2]].max()
    # The cosine ranking is the one Similarity gives without a label.
    plain = nlp.Similarity(nlp_pb2.SimilarityRequest(model_name="sentiment", query="How was the hotel?",
                                                     candidates=candidates), timeout=30)  # fmt: skip
    assert list(reply.ranking) == list(plain.ranking) and not plain.reranking


@pytest.mark.parametrize(
    ("model", "label", "fragment"),
    [("sentiment", "joyful", "rerank_label: 'joyful' is not a label of 'sentiment'; use one of"),
     ("minilm-l6-v2", "positive", "rerank_label: 'minilm-l6-v2' is an embedding model")],
)  # fmt: skip
def test_reranking_by_a_label_the_model_lacks_is_invalid(nlp, model, label, fragment):
    with pytest.raises(grpc.RpcError) as caught:
        nlp.Similarity(nlp_pb2.SimilarityRequest(model_name=model, query="q", candidates=["a"], rerank_label=label),
                       timeout=30)  # fmt: skip
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in caught.value.details()
