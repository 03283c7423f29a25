"""`python -m services.dense`: the dense model service."""

from __future__ import annotations

from services.dense.runtime import DenseRuntime, onnx_loader
from services.dense.servicer import DenseServicer
from services.dense.settings import DenseSettings
from shared.families import family
from shared.model_service import build_repository, serve_models
from shared.onnx_session import OnnxConfig, check_device
from shared.workers import run_server_process

FAMILY = family("dense")


async def serve(settings: DenseSettings) -> None:
    config = OnnxConfig.from_settings(settings)
    check_device(config)  # device=cuda that cannot run here stops the service now, with the reason
    repository = build_repository(settings, FAMILY.name, onnx_loader(config))
    servicer = DenseServicer(DenseRuntime(repository))
    await serve_models(settings, FAMILY, repository, servicer)


def main() -> None:
    run_server_process(FAMILY.name, FAMILY.module, DenseSettings(), serve)


if __name__ == "__main__":
    main()
