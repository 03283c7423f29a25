"""Converters from manifests and repository entries to `maas.common.v1` model messages."""

from __future__ import annotations

from maas.common.v1 import model_pb2, tensor_pb2
from shared.model_store import Manifest, TensorSignature
from shared.tensors import DTYPE_CODES


def to_tensor_spec(signature: TensorSignature) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=signature.name,
        dtype=DTYPE_CODES.get(signature.dtype, tensor_pb2.DataType.DATA_TYPE_UNSPECIFIED),
        shape=signature.shape,
    )


def to_model_version(manifest: Manifest, state: int, reason: str = "", device: str = "") -> model_pb2.ModelVersion:
    return model_pb2.ModelVersion(
        name=manifest.name,
        version=manifest.version,
        family=manifest.family,
        framework=manifest.framework,
        inputs=[to_tensor_spec(spec) for spec in manifest.inputs],
        outputs=[to_tensor_spec(spec) for spec in manifest.outputs],
        metrics=manifest.metrics,
        sha256=manifest.files,
        state=state,
        state_reason=reason,
        device=device,
        class_names=manifest.class_names,
        created_at=manifest.created_at,
        source=manifest.source,
        description=manifest.description,
        size_bytes=manifest.size_bytes,
        owner=manifest.owner,
        masked_features=[int(c) for c in (manifest.config.get("torch_form") or {}).get("masked") or []],
        no_payload_logging=manifest.config.get("payload_logging") is False,
    )
