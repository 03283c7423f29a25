"""Settings of the dense service, read from MAAS_DENSE_* variables in `main()`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ModelServiceSettings


class DenseSettings(ModelServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_DENSE_", extra="ignore")

    port: int = Field(50061, description="gRPC port of the dense service (every worker binds it).")
    drift_interval_s: float = Field(
        60.0, ge=0, description="How often each version's recent payload records are compared with its training "
        "reference sample (shared/drift.py); 0 turns drift checks off. Needs EVENTS_REDIS_URL and payload logging."
    )
    drift_window: int = Field(500, ge=10, description="Recent payload records a drift check reads per model.")
    drift_min_rows: int = Field(50, ge=2, description="Logged rows a drift check needs before it judges.")
    drift_p_value: float = Field(0.01, gt=0, lt=1, description="KS p-value under which a feature drifts "
                                 "(divided by the number of features).")  # fmt: skip
    drift_retrain: bool = Field(False, description="Queue one retraining job (the job's own spec, its gate included) "
                                "for a drifting version a training job made.")  # fmt: skip
