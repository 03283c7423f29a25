"""`python -m services.nlp`: the language model service."""

from __future__ import annotations

from services.nlp.runtime import NlpRuntime, nlp_loader
from services.nlp.servicer import NlpServicer
from services.nlp.settings import NlpSettings
from shared.explanations import ExplanationRunner
from shared.families import family
from shared.keyring import Keyring
from shared.model_service import build_repository, serve_models
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig, check_device
from shared.workers import run_server_process

FAMILY = family("nlp")


async def serve(settings: NlpSettings) -> None:
    config = OnnxConfig.from_settings(settings)
    check_device(config)  # device=cuda that cannot run here stops the service now, with the reason
    loader = nlp_loader(ModelStore(settings.model_store, Keyring.from_settings(settings)), config,
                        settings.max_sequence_length)  # fmt: skip
    repository = build_repository(settings, FAMILY.name, loader)
    explainer = ExplanationRunner(repository.store, loader, settings.explain_threads)
    servicer = NlpServicer(NlpRuntime(repository, settings.max_batch_texts, explainer))
    await serve_models(settings, FAMILY, repository, servicer)


def main() -> None:
    run_server_process(FAMILY.name, FAMILY.module, NlpSettings(), serve)


if __name__ == "__main__":
    main()
