"""OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models`, for the official clients.

Texts go to the nlp family's Predict through the gateway's proxy (cache, deadlines, tenancy, limits),
so the vectors are exactly the gRPC NlpService's. `dimensions` below the model's truncates each vector
and L2-normalises it again (MiniLM was not trained for truncation, so quality falls as dimensions do);
more than the model's is refused. `usage` counts tokens approximately: the gateway has no tokenizer
(the model files live in the services' store), so a text counts one token per word or punctuation
mark, plus the two special tokens; WordPiece splits rare words further, so this undercounts them.
Errors use OpenAI's error object.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from gateway.auth import current_tenant
from gateway.http.context import HttpCallContext
from gateway.http.schemas import EmbeddingsRequest, EmbeddingsResponse, OpenAIError, OpenAIModel, OpenAIModelList
from gateway.proxy import ROUTE_BY_FAMILY
from maas.nlp.v1 import nlp_pb2
from shared.errors import InvalidArgumentError, NotFoundError
from shared.tensors import to_numpy

EMBEDDING = "embedding"
MAX_INPUTS = 2048  # OpenAI's own limit per request; the nlp service's texts-per-call limit applies too
_TOKENS = re.compile(r"\w+|[^\w\s]")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": description}
    for status, description in (
        (400, "invalid_request_error: the param field names what is wrong"),
        (401, "authentication_error: missing or unknown API key"),
        (404, "invalid_request_error: no such model (code model_not_found), as OpenAI answers"),
        (413, "invalid_request_error: the request body is over the gateway's limit"),
        (429, "rate_limit_error: rate limit reached, or a queue is full"),
        (503, "server_error: a backend is down or the gateway is starting; retry"),
        (504, "timeout_error: the deadline passed"),
    )
}


class OpenAIRequestError(InvalidArgumentError):
    """A bad request, with the OpenAI `param` it concerns and an optional `code`."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.error_code = code


class ModelNotFoundError(NotFoundError):
    param = "model"
    error_code = "model_not_found"


def approximate_tokens(text: str) -> int:
    return len(_TOKENS.findall(text)) + 2


def texts_of(value: str | list) -> list[str]:
    """The texts of an `input`; token arrays and empty texts are refused."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise OpenAIRequestError("'input' must not be empty", "input")
    if not all(isinstance(text, str) for text in texts):
        raise OpenAIRequestError(
            "'input' as token arrays is not supported here: maas embeds text with the model's own tokenizer; "
            "send a string or a list of strings", "input", "unsupported_input",
        )  # fmt: skip
    if len(texts) > MAX_INPUTS:
        raise OpenAIRequestError(f"'input' has {len(texts)} texts; at most {MAX_INPUTS} per request", "input")
    for i, text in enumerate(texts):
        if not text:
            raise OpenAIRequestError(f"'input[{i}]' is an empty string; every text needs at least one character",
                                     "input")  # fmt: skip
    return texts


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components of each vector, L2-normalised again."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    if dimensions > vectors.shape[1]:
        raise OpenAIRequestError(f"'dimensions' is {dimensions}; this model's embeddings have {vectors.shape[1]}",
                                 "dimensions")  # fmt: skip
    cut = vectors[:, :dimensions].astype(np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.where(norms == 0, 1, norms)


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


async def embedding_model(front, name: str):
    """The visible embedding model called `name`, and its default version's width (0 when unknown)."""
    if not name:
        raise OpenAIRequestError("'model' is required", "model")
    try:
        family, model = await front.catalog.find_visible(name, current_tenant())
    except NotFoundError:
        raise ModelNotFoundError(f"The model '{name}' does not exist or you do not have access to it.") from None
    default = next((v for v in model.versions if v.version == model.default_version), None)
    outputs = {spec.name: spec for spec in default.outputs} if default is not None else {}
    if family != "nlp" or (default is not None and EMBEDDING not in outputs):
        raise OpenAIRequestError(f"'{name}' is not an embedding model; try one with an 'embedding' output, "
                                 "such as minilm-l6-v2", "model")  # fmt: skip
    width = outputs[EMBEDDING].shape[-1] if EMBEDDING in outputs and len(outputs[EMBEDDING].shape) else 0
    return model, max(0, width)


router = APIRouter(tags=["OpenAI-compatible"], responses=ERRORS)


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, summary="Create embeddings")
async def create_embeddings(
    body: EmbeddingsRequest,
    request: Request,
    x_request_timeout: float | None = Header(None, gt=0, description="Deadline in seconds; default 30 s."),
):
    front = request.app.state.front
    texts = texts_of(body.input)
    model, width = await embedding_model(front, body.model)
    if body.dimensions is not None and width and body.dimensions > width:
        raise OpenAIRequestError(f"'dimensions' is {body.dimensions}; {body.model}'s embeddings have {width}",
                                 "dimensions")  # fmt: skip
    route = ROUTE_BY_FAMILY["nlp"]
    message = nlp_pb2.PredictRequest(model_name=model.name, texts=texts)
    context = HttpCallContext.from_request(request)
    raw = await front.proxy.predict_message(route, message, message.SerializeToString(), context)
    reply = route.predict_response.FromString(raw)
    if EMBEDDING not in reply.outputs:
        raise OpenAIRequestError(f"'{body.model}' is not an embedding model", "model")
    vectors = shorten(to_numpy(reply.outputs[EMBEDDING], EMBEDDING), body.dimensions)
    tokens = sum(approximate_tokens(text) for text in texts)
    content = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)
        ],
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    headers = {"maas-model-version": str(reply.model_version)}
    if (outcome := context.trailing("maas-cache")) is not None:
        headers["maas-cache"] = outcome
    return JSONResponse(content, headers=headers)


def _created(model) -> int:
    """The Unix time its default version was made (0 when unknown)."""
    version = next((v for v in model.versions if v.version == model.default_version), None)
    try:
        return int(datetime.fromisoformat(version.created_at).timestamp()) if version and version.created_at else 0
    except ValueError:
        return 0


def _as_openai_model(model) -> dict:
    owner = next((v.owner for v in model.versions if v.owner), "")
    return {"id": model.name, "object": "model", "created": _created(model), "owned_by": owner or "maas"}


@router.get("/v1/models", response_model=OpenAIModelList, summary="List models")
async def list_models(request: Request) -> dict:
    front = request.app.state.front
    tenant = current_tenant()
    catalog = front.catalog
    models = [m for family in catalog.models.values() for m in family.values() if catalog.visible(m, tenant)]
    return {"object": "list", "data": [_as_openai_model(m) for m in sorted(models, key=lambda m: m.name)]}


@router.get("/v1/models/{model}", response_model=OpenAIModel, summary="Retrieve a model")
async def retrieve_model(model: str, request: Request) -> dict:
    front = request.app.state.front
    try:
        _, found = await front.catalog.find_visible(model, current_tenant())
    except NotFoundError:
        raise ModelNotFoundError(f"The model '{model}' does not exist or you do not have access to it.") from None
    return _as_openai_model(found)
