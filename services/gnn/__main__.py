"""`python -m services.gnn`: the graph neural network service."""

from __future__ import annotations

import torch

from services.gnn.explain import GnnExplainLimits, GnnExplanations
from services.gnn.graph_store import GraphStore
from services.gnn.runtime import GnnRuntime, gnn_loader
from services.gnn.servicer import GnnServicer
from services.gnn.settings import GnnSettings
from shared.explanations import ExplanationRunner
from shared.families import family
from shared.model_service import build_repository, serve_models
from shared.onnx_session import OnnxConfig
from shared.torch_device import resolve_torch_device
from shared.workers import run_server_process

FAMILY = family("gnn")


async def serve(settings: GnnSettings) -> None:
    torch.set_num_threads(settings.torch_threads)
    device = resolve_torch_device(settings.device, settings.device_index, settings.gpu_memory_limit_mb)
    onnx = OnnxConfig.from_settings(settings) if settings.onnx_graph_classifiers else None
    repository = build_repository(settings, FAMILY.name, gnn_loader(device, onnx))
    plaintext = settings.graph_plaintext() if repository.store.encrypted else None  # plain graphs map the store
    graphs = GraphStore(repository.store, settings.graph_limits(), versioning=settings.graph_versioning(),
                        plaintext=plaintext)  # fmt: skip
    limits = GnnExplainLimits(settings.max_explain_rows, settings.max_explain_steps)
    explanations = GnnExplanations(repository, ExplanationRunner(threads=settings.explain_threads), limits,
                                   settings.query_limits(), graphs)  # fmt: skip
    servicer = GnnServicer(GnnRuntime(repository, graphs, settings.query_limits()), explanations)
    await serve_models(settings, FAMILY, repository, servicer, key_stores={"graphs": graphs.store})


def main() -> None:
    run_server_process(FAMILY.name, FAMILY.module, GnnSettings(), serve)


if __name__ == "__main__":
    main()
