"""Input drift: the calls a version gets, against a sample of the data it was trained on.

A dense version is published with a reference sample of its training inputs (`reference.npy`, up to
REFERENCE_ROWS rows, each flattened to one row of features; named by the manifest's
`config.drift_reference`). The service that serves it reads the version's recent payload records
(gateway/payloads.py: the payload log must sample the model) every `drift_interval_s`, and runs a
two-sample Kolmogorov–Smirnov test per feature (scipy.stats.ks_2samp) between them and the reference.
A feature drifts when its p-value is under `drift_p_value` divided by the number of features
(Bonferroni). Masked feature columns (logged as null) are left out.

- `maas_model_drift_score{model,version}`: the largest KS statistic over the features (0 to 1);
- `maas_model_drift_features{model,version}`: how many features drift;
- `maas_model_drift_rows{model,version}`: how many logged rows were compared;
- `maas_model_drift_checks_total{model,version}`: checks that had enough rows to judge.

With `drift_retrain`, a version whose features drift and that a training job made gets one
retraining job: the job's own spec (its data set, architecture and promotion gate) submitted again
to the family's queue under the idempotency key `drift:<model>:v<version>`, so every replica and
every later check finds the same job instead of queueing another. Whether the new version becomes
the default is the gate's decision, as for any job.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from scipy.stats import ks_2samp

from maas.common.v1 import model_pb2
from shared.errors import MaasError
from shared.jobs import JobStore
from shared.keyring import Keyring
from shared.payload_streams import sealing_context, streams_of

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.npy"
REFERENCE_ROWS = 500

DRIFT_SCORE = Gauge("maas_model_drift_score", "Largest per-feature KS statistic, logged inputs against the "
                    "training reference", ["model", "version"], multiprocess_mode="max")  # fmt: skip
DRIFT_FEATURES = Gauge("maas_model_drift_features", "Features whose logged inputs drift from the training reference",
                       ["model", "version"], multiprocess_mode="max")  # fmt: skip
DRIFT_CHECKS = Counter("maas_model_drift_checks_total", "Drift checks that compared logged rows with the reference",
                       ["model", "version"])  # fmt: skip
DRIFT_ROWS = Gauge("maas_model_drift_rows", "Logged rows compared with the training reference",
                   ["model", "version"], multiprocess_mode="max")  # fmt: skip


def reference_bytes(x: np.ndarray, seed: int = 0) -> bytes:
    """Up to REFERENCE_ROWS rows of `x` (one row per example, flattened), as .npy bytes."""
    rows = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if len(rows) > REFERENCE_ROWS:
        rows = rows[np.random.default_rng(seed).choice(len(rows), REFERENCE_ROWS, replace=False)]
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    return buffer.getvalue()


def load_reference(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


@dataclass(frozen=True)
class DriftReport:
    score: float  # the largest KS statistic
    drifted: list[int]  # the features that drift
    rows: int  # logged rows compared


def compare(reference: np.ndarray, current: np.ndarray, p_value: float) -> DriftReport:
    """KS per feature; NaN (masked, or not logged) columns are left out. Bonferroni over the features tested."""
    results = []
    for feature in range(reference.shape[1]):
        column = current[:, feature]
        column = column[~np.isnan(column)]
        if len(column) >= 2:
            results.append((feature, ks_2samp(reference[:, feature], column)))
    threshold = p_value / max(1, len(results))
    score = max((float(r.statistic) for _, r in results), default=0.0)
    return DriftReport(score, [f for f, r in results if r.pvalue < threshold], len(current))


def logged_rows(events: list[dict], version: int, width: int) -> np.ndarray:
    """The first input of each record of `version`, one row per example of `width` features (null → NaN)."""
    rows = []
    for event in events:
        if event.get("maasversion") != str(version):
            continue
        inputs = (event.get("data") or {}).get("request", {}).get("inputs") or {}
        tensor = next(iter(inputs.values()), None)
        if not tensor or "data" not in tensor:
            continue
        values = np.array(tensor["data"], dtype=object).reshape(-1)
        values = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        if values.size % width:
            continue
        rows.append(values.reshape(-1, width))
    return np.concatenate(rows) if rows else np.zeros((0, width))


class DriftMonitor:
    """Checks every loaded version that has a reference sample, against its recent payload records."""

    def __init__(self, repository, redis_url: str, interval_s: float, window: int, min_rows: int, p_value: float,
                 retrain: bool, keyring: Keyring | None = None) -> None:  # fmt: skip
        self.keyring = keyring  # opens sealed payload records
        self.repository = repository
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self.interval_s = interval_s
        self.window = window
        self.min_rows = min_rows
        self.p_value = p_value
        self.retrain = retrain
        self._references: dict[tuple[str, int], np.ndarray | None] = {}

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await self.check_all()
                except Exception:  # noqa: BLE001 - a bad record or a Redis outage must not stop the monitor
                    log.exception("drift check failed")
        finally:
            await self.redis.aclose()

    async def check_all(self) -> None:
        for model in self.repository.describe_all():
            for version in model.versions:
                if version.state == model_pb2.MODEL_STATE_READY:
                    await self.check(model.name, version.version)

    async def check(self, name: str, version: int) -> DriftReport | None:
        reference = await self._reference(name, version)
        if reference is None:
            return None
        events = await self._recent(name)
        current = logged_rows(events, version, reference.shape[1])
        labels = (name, str(version))
        DRIFT_ROWS.labels(*labels).set(len(current))
        if len(current) < self.min_rows:
            return None
        report = await asyncio.to_thread(compare, reference, current, self.p_value)
        DRIFT_CHECKS.labels(*labels).inc()
        DRIFT_SCORE.labels(*labels).set(report.score)
        DRIFT_FEATURES.labels(*labels).set(len(report.drifted))
        if report.drifted:
            log.warning("%s v%d: %d of %d features drift from the training data (largest KS %.2f, %d rows)",
                        name, version, len(report.drifted), reference.shape[1], report.score, report.rows)  # fmt: skip
            if self.retrain:
                await self._retrain(name, version)
        return report

    async def _reference(self, name: str, version: int) -> np.ndarray | None:
        key = (name, version)
        if key not in self._references:
            entry = self.repository.resolve(name, version)
            file = entry.manifest.config.get("drift_reference")
            if not file or file not in entry.manifest.files:
                self._references[key] = None
            else:
                artifacts = await self.repository.run(self.repository.store.artifacts, entry.manifest)
                raw = await self.repository.run(artifacts.read, file)  # checked against its sha256
                self._references[key] = load_reference(raw)
        return self._references[key]

    async def _recent(self, name: str) -> list[dict]:
        events: list[dict] = []
        async for key in self.redis.scan_iter(match=streams_of(name), count=100):
            entries = await self.redis.xrevrange(key, count=self.window)
            events.extend(await asyncio.to_thread(self._open, key, entries))
        events.sort(key=lambda e: e.get("time", ""), reverse=True)
        return events[: self.window]

    def _open(self, key: bytes, entries) -> list[dict]:
        events = []
        for _, fields in entries:
            if b"event" in fields:
                events.append(json.loads(fields[b"event"]))
            elif self.keyring is not None and self.keyring.keys_dir is not None:
                try:
                    plaintext, _, _ = self.keyring.open(fields[b"sealed"], sealing_context(key),
                                                         "a payload record")  # fmt: skip
                except MaasError as exc:  # a KEK this service lacks: that record is not read
                    log.warning("a payload record in %s cannot be opened here: %s", key.decode(), exc)
                    continue
                events.append(json.loads(plaintext))
        return events

    async def _retrain(self, name: str, version: int) -> None:
        entry = self.repository.resolve(name, version)
        spec: dict[str, Any] | None = entry.manifest.config.get("spec")
        if not spec:
            log.info("%s v%d drifts but no training job made it: no spec to retrain with", name, version)
            return
        jobs = JobStore(self.redis)
        job_id, created = await jobs.submit(self.repository.family, spec, f"drift:{name}:v{version}",
                                            entry.manifest.owner)  # fmt: skip
        if created:
            log.warning("%s v%d drifts: retraining job %s queued", name, version, job_id)
