"""`python -m services.nlp.trainer`: runs queued nlp training jobs, separate from the inference service."""

from __future__ import annotations

import asyncio

from services.nlp import datasets
from services.nlp.explain_job import run_explain_job
from services.nlp.training import run_job
from shared.logs import configure_logging
from shared.settings import trainer_settings
from shared.training_worker import DataSource, by_kind, serve_trainer


def main() -> None:
    settings = trainer_settings("nlp")
    configure_logging("nlp-trainer", settings.log_level, settings.log_format)
    data = DataSource(datasets.parse, datasets.describe, datasets.load_builtin)
    asyncio.run(serve_trainer("nlp", by_kind(run_job, run_explain_job), settings, data))


if __name__ == "__main__":
    main()
