"""The Grafana dashboard and the Prometheus rules name only metrics that a running cluster exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.models.v1 import models_pb2
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from shared.families import FAMILIES
from shared.tensors import from_numpy
from tests.e2e.test_canary import ids_in, predict, publish_two_versions
from tests.e2e.test_training import wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "maas.json"
RULES = DEPLOY / "prometheus" / "maas-rules.yaml"
# Series Prometheus makes itself for every scrape target; no process exposes them.
SYNTHESIZED = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset"}  # fmt: skip


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    rules = yaml.safe_load(RULES.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: its identifiers that are no function, keyword or label."""
    text = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if not text[match.end() :].lstrip().startswith("("):  # not a function
            names.add(match.group())
    return names - PROMQL_WORDS


def test_every_panel_and_rule_names_a_metric():
    for expr in expressions():
        assert metric_names(expr), expr
    assert "maas_request_seconds_bucket" in metric_names(
        'histogram_quantile(0.99, sum by (le, model) (rate(maas_request_seconds_bucket{model!=""}[5m])))'
    )


def exposed(url: str) -> set[str]:
    """Every series name a /metrics page declares or carries (histogram and counter suffixes included)."""
    text = wait_for(lambda: _scrape(url), timeout=90, what=f"{url} to answer")  # trainers open it once started
    names = set(re.findall(r"^# (?:HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.MULTILINE))
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def _scrape(url: str) -> str | None:
    try:
        with urlopen(url, timeout=30) as response:
            return response.read().decode()
    except URLError:
        return None


def exercise(cluster) -> None:
    """Calls that make the gateway's per-worker counters exist: predictions (a cache miss, then a hit),
    and HTTP requests."""
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        dense = dense_pb2_grpc.DenseServiceStub(channel)
        pixels = from_numpy(np.full((1, 64), 3.0, np.float32))
        request = dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": pixels})
        for _ in range(2):
            dense.Predict(request, timeout=30)
        nlp_pb2_grpc.NlpServiceStub(channel).Predict(nlp_pb2.PredictRequest(model_name="sentiment", texts=["ok"]),
                                                     timeout=30)  # fmt: skip
    with urlopen(f"http://127.0.0.1:{cluster.ports.gateway_http}/v2/health/ready", timeout=30):
        pass
    # A model with a canary, and calls on both arms (ids on either side of the split).
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        models = publish_two_versions(cluster, channel, "dashboard-canary")
        models.SetCanary(models_pb2.SetCanaryRequest(model_name="dashboard-canary", model_version=2, percent=50),
                         timeout=10)  # fmt: skip
        wait_for(lambda: all(predict(channel, i, "dashboard-canary") == 2 for i in ids_in(0, 50, 4))
                 and all(predict(channel, i, "dashboard-canary") == 1 for i in ids_in(50, 100, 4)),
                 timeout=30, what="the canary to split")  # fmt: skip
        # A shadow on the same version: copies of the default's calls, compared.
        models.SetShadow(models_pb2.SetShadowRequest(model_name="dashboard-canary", model_version=2, percent=100),
                         timeout=10)  # fmt: skip
        url = f"http://127.0.0.1:{cluster.ports.gateway_metrics}/metrics"
        rng = np.random.default_rng(3)  # distinct inputs: a cache hit is not copied
        wait_for(lambda: predict(channel, ids_in(50, 100, 1)[0], "dashboard-canary", rng.uniform(0, 16)) == 1
                 and "maas_gateway_shadow_abs_difference_bucket{" in (_scrape(url) or ""), timeout=30,
                 what="a shadow copy to be compared")  # fmt: skip


def test_every_metric_named_exists_in_a_live_cluster(cluster):
    exercise(cluster)
    ports = cluster.ports
    pages = [ports.gateway_metrics] + [getattr(ports, f"{f.name}_metrics") for f in FAMILIES]
    pages += [getattr(ports, f"{f.name}_trainer_metrics") for f in FAMILIES]
    live: set[str] = set()
    for port in pages:
        live |= exposed(f"http://127.0.0.1:{port}/metrics")
    named = set().union(*(metric_names(expr) for expr in expressions()))
    assert "maas_http_requests_total" in named and "maas_training_jobs_total" in named
    missing = named - live - SYNTHESIZED
    assert not missing, f"the dashboard or rules name metrics no process exposes: {sorted(missing)}"


def test_the_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: install Debian's prometheus package (.ci/run does) to check the rules")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
