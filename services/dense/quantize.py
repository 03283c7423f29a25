"""`python -m services.dense.quantize MODEL`: stores a dynamically INT8-quantized version of a dense model.

The new version's manifest carries its own held-out metrics and size next to those of the
fp32 version it came from. The current default stays the default unless --promote is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

from services.dense.defaults import evaluate_onnx
from shared.errors import MaasError
from shared.logs import configure_logging
from shared.model_store import Manifest, ModelStore

log = logging.getLogger(__name__)


def quantize_version(store: ModelStore, name: str, version: int = 0, promote: bool = False) -> Manifest:
    base = store.manifest(name, version or store.default_version(name))
    if base.framework != "onnx" or base.family != "dense":
        raise ValueError(f"{name} v{base.version} is a {base.family}/{base.framework} model; need dense/onnx")
    if "quantization" in base.config:
        raise ValueError(f"{name} v{base.version} is already quantized")
    directory = store.verify(base)
    default_before = store.default_version(name)
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "model.onnx"
        quantize_dynamic(directory / base.config["onnx_file"], quantized, weight_type=QuantType.QInt8)
        metrics = evaluate_onnx(quantized, base.config["dataset"], base.inputs[0].name)
        record = base.model_dump(exclude={"version", "files", "created_at", "size_bytes"})
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
    args = parser.parse_args()
    configure_logging("quantize")
    try:
        manifest = quantize_version(ModelStore(args.store), args.model, args.version, args.promote)
    except (MaasError, ValueError) as exc:
        sys.exit(f"quantize: {exc}")
    print(f"{manifest.name} v{manifest.version}: {manifest.metrics} size {manifest.size_bytes} bytes")


if __name__ == "__main__":
    main()
