"""The shapes of the HTTP front's requests and responses, for its OpenAPI document and its replies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# --- KServe v2 (the Open Inference Protocol over REST) ---------------------------------------------


class KServeError(BaseModel):
    error: str = Field(description="What went wrong; the HTTP status carries the gRPC status it maps.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    version: str = Field("", description="The version asked about; empty for the default.")
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description='"FP32", "INT64", "BYTES", ...')
    shape: list[int] = Field(description="-1 marks a variable dimension.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal["FP32", "FP16", "FP64", "INT8", "INT32", "INT64", "UINT8", "BOOL", "BYTES"]
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the input's bytes follow the JSON header (binary tensor extension)"
    )
    data: list[Any] | None = Field(None, description="Row-major elements, flat or nested; strings for BYTES")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true returns the output as binary")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: true returns every output as binary; gnn models take stored_graph"
    )
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ModelConfigInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    data_type: str
    dims: list[int]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ModelConfigInput]
    output: list[ModelConfigInput]


# --- OpenAI-compatible embeddings ---------------------------------------------------------------------


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


Text = Annotated[str, Field(min_length=1)]


class EmbeddingsRequest(BaseModel):
    model: str = Field(min_length=1, description="An nlp embedding model, e.g. minilm-l6-v2")
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=2048)] = Field(
        description="A text or a list of up to 2048 texts. Token arrays are refused: send text."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        description="Fewer dimensions than the model's: the vector is truncated and L2-normalised again",
    )
    user: str | None = Field(None, description="Accepted and ignored")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
            raise ValueError(
                "token arrays are not supported here: maas embeds text with the model's own tokenizer; "
                "send a string or a list of strings"
            )
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# --- the console's API -----------------------------------------------------------------------------------


class WhoAmI(BaseModel):
    tenant: str
    admin: bool
    keys_required: bool


class ConsoleVersion(BaseModel):
    version: int
    state: str
    state_reason: str
    device: str
    framework: str
    metrics: dict[str, float]
    created_at: str
    source: str
    size_bytes: int


class ConsoleModel(BaseModel):
    name: str
    family: str
    owner: str
    default_version: int
    versions: list[ConsoleVersion]


class ConsoleModels(BaseModel):
    models: list[ConsoleModel]


class Promote(BaseModel):
    version: int = Field(ge=1, le=2**63 - 1, description="The version to make the default")


class Job(BaseModel):
    job_id: str
    state: str
    family: str
    architecture: str
    output_model: str
    epoch: int
    epochs: int
    train_loss: float
    metrics: dict[str, float]
    model_version: int
    promoted: bool
    error: str
    created_at: str
    updated_at: str


class Jobs(BaseModel):
    jobs: list[Job]


class Stats(BaseModel):
    time: float = Field(description="Unix time of the snapshot")
    workers: int = Field(description="Gateway worker processes whose counters are summed")
    cache: dict[str, float] = Field(description="Result cache look-ups by outcome, summed over families")
    grpc_requests: dict[str, dict[str, float]] = Field(description="gRPC calls by service/method, then status code")
    http_requests: dict[str, dict[str, float]] = Field(description="HTTP requests by route, then status")
