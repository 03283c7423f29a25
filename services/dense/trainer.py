"""`python -m services.dense.trainer`: runs queued dense training jobs, separate from the inference service."""

from __future__ import annotations

import asyncio

from services.dense.training import run_job
from shared.logs import configure_logging
from shared.settings import trainer_settings
from shared.training_worker import serve_trainer


def main() -> None:
    settings = trainer_settings("dense")
    configure_logging("dense-trainer", settings.log_level, settings.log_format)
    asyncio.run(serve_trainer("dense", run_job, settings))


if __name__ == "__main__":
    main()
