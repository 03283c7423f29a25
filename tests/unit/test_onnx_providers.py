"""Provider lists built from a service's runtime settings."""

import pytest

from shared import onnx_session
from shared.onnx_session import OnnxConfig, execution_providers


def test_cpu_device_uses_only_the_cpu():
    assert execution_providers(OnnxConfig(device="cpu")) == ["CPUExecutionProvider"]


def test_without_a_usable_gpu_everything_falls_back_to_the_cpu():
    if onnx_session.cuda_usable():
        pytest.skip("this machine has a working CUDA provider")
    config = OnnxConfig(device="cuda", providers=("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    assert execution_providers(config) == ["CPUExecutionProvider"]


def test_gpu_options_carry_the_device_index_and_memory_cap(monkeypatch):
    # Option assembly only: whether the provider loads is probed separately, on real hardware.
    monkeypatch.setattr(onnx_session, "gpu_provider_usable", lambda provider="CUDAExecutionProvider": True)
    config = OnnxConfig(
        device_index=1,
        gpu_memory_limit_mb=512,
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    )
    trt, cuda, cpu = execution_providers(config)
    assert trt == ("TensorrtExecutionProvider", {"device_id": 1})
    assert cuda[0] == "CUDAExecutionProvider"
    assert cuda[1]["device_id"] == 1 and cuda[1]["gpu_mem_limit"] == 512 * 1024 * 1024
    assert cpu == "CPUExecutionProvider"
