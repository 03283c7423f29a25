"""Settings of the gnn service, read from MAAS_GNN_* variables in `main()`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ModelServiceSettings


class GnnSettings(ModelServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_GNN_", extra="ignore")

    port: int = 50062
    max_batch_size: int = Field(4096, description="Most nodes, over all merged graphs, in one batch.")
