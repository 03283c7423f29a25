"""OpenAI-compatible embeddings, called with the official `openai` package."""

from __future__ import annotations

import base64
import json
from http.client import HTTPConnection

import numpy as np
import openai
import pytest

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from shared.tensors import to_numpy

TEXTS = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.ports.gateway_http}/v1", api_key="unused",
                       max_retries=0, timeout=60) as client:  # fmt: skip
        yield client


@pytest.fixture(scope="module")
def grpc_vectors(gateway_channel):
    reply = nlp_pb2_grpc.NlpServiceStub(gateway_channel).Predict(
        nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=TEXTS), timeout=60
    )
    return to_numpy(reply.outputs["embedding"], "embedding")


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings_equal_the_grpc_service(client, grpc_vectors, encoding_format):
    reply = client.embeddings.create(model="minilm-l6-v2", input=TEXTS, encoding_format=encoding_format)
    assert reply.object == "list" and reply.model == "minilm-l6-v2"
    assert [d.index for d in reply.data] == [0, 1, 2] and all(d.object == "embedding" for d in reply.data)
    # Asked for explicitly, base64 comes back as the string the gateway sent: little-endian float32.
    vectors = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if isinstance(d.embedding, str)
                        else d.embedding for d in reply.data], dtype=np.float32)  # fmt: skip
    assert isinstance(reply.data[0].embedding, str) is (encoding_format == "base64")
    np.testing.assert_allclose(vectors, grpc_vectors, atol=1e-5)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens >= len(" ".join(TEXTS).split())


def test_the_client_default_base64_is_decoded_by_the_client(client, grpc_vectors):
    # Without encoding_format the client asks for base64 and decodes it itself.
    reply = client.embeddings.create(model="minilm-l6-v2", input=TEXTS[0])
    np.testing.assert_allclose(np.array(reply.data[0].embedding, np.float32), grpc_vectors[0], atol=1e-5)


def test_raw_base64_is_little_endian_float32(client, grpc_vectors):
    raw = client.embeddings.with_raw_response.create(model="minilm-l6-v2", input=TEXTS[:1], encoding_format="base64")
    body = json.loads(raw.http_response.text)
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, grpc_vectors[0], atol=1e-5)


def test_fewer_dimensions_truncate_and_renormalise(client, grpc_vectors):
    reply = client.embeddings.create(model="minilm-l6-v2", input=TEXTS, dimensions=64, encoding_format="float")
    vectors = np.array([d.embedding for d in reply.data], dtype=np.float32)
    expected = grpc_vectors[:, :64] / np.linalg.norm(grpc_vectors[:, :64], axis=1, keepdims=True)
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_models_are_listed_in_openai_shape(client):
    models = {m.id: m for m in client.models.list()}
    assert {"minilm-l6-v2", "sentiment", "digits-mlp"} <= set(models)
    assert models["minilm-l6-v2"].object == "model" and models["minilm-l6-v2"].owned_by == "maas"
    assert client.models.retrieve("minilm-l6-v2").id == "minilm-l6-v2"


@pytest.mark.parametrize(
    "kwargs, error, param, fragment",
    [
        ({"model": "no-such-model", "input": "x"}, openai.NotFoundError, "model", "does not exist"),
        ({"model": "sentiment", "input": "x"}, openai.BadRequestError, "model", "not an embedding model"),
        ({"model": "minilm-l6-v2", "input": [[1, 2, 3]]}, openai.BadRequestError, "input", "token arrays"),
        ({"model": "minilm-l6-v2", "input": ""}, openai.BadRequestError, "input", "at least 1 character"),
        ({"model": "minilm-l6-v2", "input": "x", "dimensions": 385}, openai.BadRequestError, "dimensions", "384"),
        ({"model": "minilm-l6-v2", "input": "x", "encoding_format": "int8"}, openai.BadRequestError,
         "encoding_format", "float"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(client, kwargs, error, param, fragment):
    with pytest.raises(error) as err:
        client.embeddings.create(**kwargs)
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["param"] == param and fragment in body["message"], body
    assert body["type"] == "invalid_request_error"
    if error is openai.NotFoundError:
        assert err.value.status_code == 404 and body["code"] == "model_not_found"
    else:
        assert err.value.status_code == 400


def test_a_body_that_is_not_json_says_so(cluster):
    connection = HTTPConnection("127.0.0.1", cluster.ports.gateway_http, timeout=30)
    connection.request("POST", "/v1/embeddings", b"model=minilm", {"content-type": "application/x-www-form-urlencoded"})
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 400 and "JSON" in body["error"]["message"]
