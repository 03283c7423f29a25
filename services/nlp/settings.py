"""Settings of the nlp service, read from MAAS_NLP_* variables in `main()`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ModelServiceSettings


class NlpSettings(ModelServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_NLP_", extra="ignore")

    port: int = Field(50063, description="gRPC port of the nlp service (every worker binds it).")
    max_batch_texts: int = Field(256, description="Most texts one request may carry.")
    max_sequence_length: int = Field(128, description="Tokens kept per text; the rest is cut.")
