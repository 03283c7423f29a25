"""Canary traffic at the gateway: a share of a model's default traffic goes to a candidate version.

The split is set on the model (ModelService.SetCanary) and kept in the model store; the catalog
reads it with the model. It applies to calls that name no version, on every front (gRPC, Open
Inference, REST, fan-out steps), and is decided per request by a hash of its id, so a request id
always lands on the same version: a client retrying with its id gets the version it got before.
A call without an id gets a fresh one from the gateway, so such calls split at random.

Per arm ("default" or "candidate") the gateway counts calls by status, times them and, for
classifiers (an int output named "label"), counts the labels each arm answered: the three things
to compare before promoting the candidate.
"""

from __future__ import annotations

import hashlib

import numpy as np
from prometheus_client import Counter, Histogram

from maas.common.v1 import model_pb2

DEFAULT, CANDIDATE = "default", "candidate"

CANARY_REQUESTS = Counter(
    "maas_gateway_canary_requests_total",
    "Calls to a model with a canary, by arm (default or candidate), version that answered and status",
    ["model", "arm", "version", "code"],
)
CANARY_LATENCY = Histogram(
    "maas_gateway_canary_request_seconds",
    "Time the gateway took to answer calls to a model with a canary, by arm",
    ["model", "arm"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CANARY_LABELS = Counter(
    "maas_gateway_canary_labels_total",
    "Labels answered per arm of a canary (outputs named 'label'): the two arms' output distributions",
    ["model", "arm", "label"],
)
MAX_LABELS = 64  # labels counted per model and arm; a label past that counts as "other"


def share(request_id: str) -> int:
    """Where the request id falls, 0 to 99: the same id, the same place, in every gateway."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big") % 100


def choose(canary: model_pb2.Canary | None, request_id: str) -> tuple[int, str]:
    """(version to name, arm) for a call that names none: (candidate, "candidate") for the canary's
    share of request ids, (0, "default") for the rest, (0, "") for a model without a canary."""
    if canary is None:
        return 0, ""
    if share(request_id) < canary.percent:
        return canary.model_version, CANDIDATE
    return 0, DEFAULT


def record(model: str, arm: str, version: int | str, code: str, seconds: float) -> None:
    CANARY_REQUESTS.labels(model, arm, str(version or ""), code).inc()
    CANARY_LATENCY.labels(model, arm).observe(seconds)


_seen_labels: dict[tuple[str, str], set[str]] = {}


def record_labels(model: str, arm: str, labels: np.ndarray) -> None:
    seen = _seen_labels.setdefault((model, arm), set())
    values, counts = np.unique(labels.reshape(-1), return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        label = str(value)
        if label not in seen:
            if len(seen) >= MAX_LABELS:
                label = "other"
            else:
                seen.add(label)
        CANARY_LABELS.labels(model, arm, label).inc(count)
