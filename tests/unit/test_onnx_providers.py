"""Provider lists built from a service's runtime settings, and the probe that decides whether a GPU provider works."""

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from shared import onnx_session
from shared.errors import DeviceUnavailableError
from shared.onnx_session import (
    OnnxConfig,
    OnnxModel,
    ProviderCheck,
    batch_buckets,
    check_provider,
    execution_providers,
    probe_model,
)

needs_no_gpu = pytest.mark.skipif(onnx_session.cuda_usable(), reason="this machine has a working CUDA provider")


def test_the_probe_graph_runs_on_the_locked_onnxruntime():
    # The probe once came out as IR 14 (onnx 1.23's default), which ORT 1.31 refuses even on
    # the CPU, so every GPU check failed and every model silently ran on the CPU.
    session = ort.InferenceSession(probe_model(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones(1, np.float32)})[0].tolist() == [1.0]
    assert onnx.load_model_from_string(probe_model()).ir_version <= onnx.IR_VERSION
    assert check_provider("CPUExecutionProvider") == ProviderCheck("CPUExecutionProvider", True)


def test_cpu_device_uses_only_the_cpu():
    assert execution_providers(OnnxConfig(device="cpu")) == ["CPUExecutionProvider"]


@needs_no_gpu
def test_a_provider_that_cannot_run_says_why():
    check = check_provider("CUDAExecutionProvider")
    assert not check.usable
    assert check.reason  # e.g. "its library does not load: libcublasLt.so.13: cannot open shared object file"


@needs_no_gpu
def test_cuda_that_cannot_be_honoured_is_an_error_naming_the_cause():
    with pytest.raises(DeviceUnavailableError) as err:
        execution_providers(OnnxConfig(device="cuda"))
    assert "device=cuda" in str(err.value)
    assert check_provider("CUDAExecutionProvider").reason in str(err.value)


@needs_no_gpu
def test_auto_falls_back_to_the_cpu_and_says_why_once(caplog):
    onnx_session._log_fallback_once.cache_clear()
    config = OnnxConfig(device="auto", providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    with caplog.at_level(logging.WARNING, logger="shared.onnx_session"):
        assert execution_providers(config) == ["CPUExecutionProvider"]
        assert execution_providers(config) == ["CPUExecutionProvider"]
    fallbacks = [r for r in caplog.records if "CUDAExecutionProvider is not usable" in r.getMessage()]
    assert len(fallbacks) == 1
    assert check_provider("CUDAExecutionProvider").reason in fallbacks[0].getMessage()


def test_gpu_options_carry_the_serving_defaults_device_index_and_memory_cap(monkeypatch):
    # Option assembly only: whether the provider loads is probed separately, on real hardware.
    monkeypatch.setattr(
        onnx_session, "check_provider", lambda provider="CUDAExecutionProvider": ProviderCheck(provider, True)
    )
    config = OnnxConfig(
        device_index=1,
        gpu_memory_limit_mb=512,
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        extra_provider_options={"CUDAExecutionProvider": {"do_copy_in_default_stream": 1}},
    )
    trt, cuda, cpu = execution_providers(config)
    assert trt == ("TensorrtExecutionProvider", {"device_id": 1})
    assert cuda[0] == "CUDAExecutionProvider"
    assert cuda[1]["device_id"] == 1 and cuda[1]["gpu_mem_limit"] == 512 * 1024 * 1024
    # No cuDNN benchmark of every algorithm on each new batch shape.
    assert cuda[1]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda[1]["do_copy_in_default_stream"] == 1
    assert cpu == "CPUExecutionProvider"
    override = OnnxConfig(extra_provider_options={"CUDAExecutionProvider": {"cudnn_conv_algo_search": "EXHAUSTIVE"}})
    assert execution_providers(override)[0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_batch_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]


def test_padded_batches_give_every_row_what_it_gets_alone(model_store):
    """The GPU padding path, run here on the CPU provider: rows padded to a bucket are cut off again."""
    manifest = model_store.manifest("digits-cnn", model_store.default_version("digits-cnn"))
    onnx = model_store.artifacts(manifest).read(manifest.config["onnx_file"])
    model = OnnxModel(onnx, manifest.inputs, OnnxConfig(device="cpu"))
    assert not model.pad_batches  # padding is for GPU sessions only
    model.pad_batches = True
    model.warm_up(16)
    assert model.buckets == [1, 2, 4, 8, 16]
    rng = np.random.default_rng(0)
    items = [{"image": rng.random((n, 1, 8, 8), np.float32) * 16} for n in (1, 2, 2)]  # 5 rows, padded to 8
    batched = model.run_batch(items)
    for item, result in zip(items, batched, strict=True):
        alone = model.session.run(item)
        assert result["probabilities"].shape == alone["probabilities"].shape
        np.testing.assert_allclose(result["probabilities"], alone["probabilities"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(result["label"], alone["label"])
    big = {"image": rng.random((40, 1, 8, 8), np.float32)}  # more rows than any bucket: run as it is
    assert model.run_batch([big])[0]["label"].shape == (40,)
