"""`python -m services.dense.quantize MODEL`: stores a dynamically INT8-quantized version of a dense model.

The new version's manifest carries its own held-out metrics and size next to those of the
fp32 version it came from. The current default stays the default unless --promote is given.

Everything happens in memory: the fp32 graph is decrypted from the store into memory, quantized
there, evaluated from bytes and published (sealed, when the store is encrypted). Nothing is written
to a temporary file, which `onnxruntime.quantization.quantize_dynamic` would do (it takes and writes paths).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata, update_opset_version
from onnxruntime.quantization.registry import IntegerOpsRegistry

from services.dense.defaults import evaluate_onnx
from shared.errors import MaasError
from shared.keyring import Keyring
from shared.logs import configure_logging
from shared.model_store import Manifest, ModelStore
from shared.settings import encryption_settings

log = logging.getLogger(__name__)


def quantize_dynamic_bytes(model: bytes, weight_type: QuantType = QuantType.QInt8) -> bytes:
    """What `quantize_dynamic` does (dynamic INT8 weights, uint8 activations, MatMul with constant B only), from
    bytes to bytes: shape inference runs in memory instead of through files."""
    proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(model))
    add_infer_metadata(proto)
    proto = update_opset_version(proto, weight_type)
    quantizer = ONNXQuantizer(
        proto,
        False,  # per_channel
        False,  # reduce_range
        QuantizationMode.IntegerOps,
        False,  # static
        weight_type,
        QuantType.QUInt8,  # dynamic activations are uint8
        None,
        [],
        [],
        list(IntegerOpsRegistry.keys()),
        {"MatMulConstBOnly": True},
    )
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    return quantizer.model.model.SerializeToString()


def quantize_version(store: ModelStore, name: str, version: int = 0, promote: bool = False) -> Manifest:
    base = store.manifest(name, version or store.default_version(name))
    if base.framework != "onnx" or base.family != "dense":
        raise ValueError(f"{name} v{base.version} is a {base.family}/{base.framework} model; need dense/onnx")
    if "quantization" in base.config:
        raise ValueError(f"{name} v{base.version} is already quantized")
    fp32 = store.artifacts(base).check_all().read(base.config["onnx_file"])
    default_before = store.default_version(name)
    quantized = quantize_dynamic_bytes(fp32)
    metrics = evaluate_onnx(quantized, base.config["dataset"], base.inputs[0].name)
    record = base.model_dump(exclude={"version", "files", "created_at", "size_bytes", "encryption"})
    record.update(
        metrics=metrics,
        source=f"quantized:{name} v{base.version} (dynamic INT8 weights)",
        description=f"{base.description} [dynamic INT8]",
        config={
            **base.config,
            "onnx_file": "model.onnx",
            "quantization": {
                "method": "dynamic",
                "weight_type": "QInt8",
                "base_version": base.version,
                "base_metrics": base.metrics,
                "base_size_bytes": base.size_bytes,
            },
        },
    )
    manifest = store.publish(record, {"model.onnx": quantized})
    if not promote:
        store.pin_default(name, default_before)
    log.info(
        "%s v%d: int8 %d bytes (fp32 v%d: %d bytes), metrics %s (fp32: %s)",
        name, manifest.version, manifest.size_bytes, base.version, base.size_bytes, metrics, base.metrics,
    )  # fmt: skip
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--version", type=int, default=0, help="fp32 version to quantize (default: the default)")
    parser.add_argument("--store", type=Path, default=Path("var/models"))
    parser.add_argument("--promote", action="store_true", help="make the quantized version the default")
    parser.add_argument("--keys-dir", type=Path, help="KEK folder of an encrypted store (MAAS_QUANTIZE_KEYS_DIR)")
    parser.add_argument("--kek-id", help="the KEK that wraps new data keys (MAAS_QUANTIZE_KEK_ID)")
    args = parser.parse_args()
    configure_logging("quantize")
    settings = encryption_settings("quantize")
    keyring = Keyring(args.keys_dir or settings.keys_dir, args.kek_id or settings.kek_id)
    try:
        manifest = quantize_version(ModelStore(args.store, keyring), args.model, args.version, args.promote)
    except (MaasError, ValueError) as exc:
        sys.exit(f"quantize: {exc}")
    print(f"{manifest.name} v{manifest.version}: {manifest.metrics} size {manifest.size_bytes} bytes")


if __name__ == "__main__":
    main()
