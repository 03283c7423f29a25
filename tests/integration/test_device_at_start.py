"""A service told to run on a GPU it cannot use stops at start with the reason, as Triton does for a
GPU instance group on a machine without one; it never serves on the CPU instead."""

import os
import subprocess
import sys

import pytest
import torch

from shared.cluster import free_port
from shared.onnx_session import check_provider, cuda_usable
from shared.workers import EXIT_CONFIG


def start(module: str, prefix: str, store, workers: int = 1) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        f"{prefix}DEVICE": "cuda",
        f"{prefix}PORT": str(free_port()),
        f"{prefix}MODEL_STORE": str(store.root),
        f"{prefix}WORKERS": str(workers),
        f"{prefix}LOG_FORMAT": "text",
    }
    return subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(cuda_usable(), reason="ONNX Runtime's CUDA provider works here")
@pytest.mark.parametrize("module, prefix", [("services.dense", "MAAS_DENSE_"), ("services.nlp", "MAAS_NLP_")])
def test_onnx_services_refuse_cuda_they_cannot_use(model_store, module, prefix):
    done = start(module, prefix, model_store)
    assert done.returncode == EXIT_CONFIG, done.stderr[-2000:]
    assert "device=cuda was requested" in done.stderr
    assert check_provider("CUDAExecutionProvider").reason in done.stderr  # the cause, e.g. a missing libcublasLt


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use CUDA here")
def test_the_gnn_service_refuses_cuda_torch_cannot_use(model_store):
    done = start("services.gnn", "MAAS_GNN_", model_store)
    assert done.returncode == EXIT_CONFIG, done.stderr[-2000:]
    assert "device=cuda was requested, but torch cannot use it" in done.stderr


@pytest.mark.skipif(cuda_usable(), reason="ONNX Runtime's CUDA provider works here")
def test_a_supervisor_stops_when_its_workers_cannot_start(model_store):
    done = start("services.dense", "MAAS_DENSE_", model_store, workers=2)
    assert done.returncode == EXIT_CONFIG, done.stderr[-2000:]
    assert "device=cuda was requested" in done.stderr
    assert "while starting; stopping the others" in done.stderr
