"""Settings of the dense service, read from MAAS_DENSE_* variables in `main()`."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from shared.settings import ModelServiceSettings


class DenseSettings(ModelServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_DENSE_", extra="ignore")

    port: int = 50061
