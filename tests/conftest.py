"""Fixtures shared by every test: the default model store and a whole cluster on free ports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest

from services.defaults import ensure_defaults
from shared.cluster import ClusterPorts, LocalCluster
from shared.model_store import ModelStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_store() -> ModelStore:
    """The default models `make test` builds (built here too when pytest runs on its own)."""
    store = ModelStore(Path(os.environ.get("MAAS_TEST_MODEL_STORE", ROOT / "var" / "models")))
    ensure_defaults(store)
    return store


@pytest.fixture(scope="session")
def cluster(model_store, tmp_path_factory):
    """Redis, the three model services and the gateway, as real processes on free ports."""
    var = tmp_path_factory.mktemp("cluster")
    # A copy: training jobs and admin calls in the tests write versions and pins.
    store = var / "models"
    shutil.copytree(model_store.root, store, ignore=shutil.ignore_patterns(".staging-*"))
    # Trainers take over a silent trainer's job after 2 s (30 s by default), so the tests run quickly.
    fast_takeover = {
        f"MAAS_{family.upper()}_TRAINER_{key}": value
        for family in ("dense", "gnn", "nlp")
        for key, value in (("CLAIM_IDLE_MS", "2000"), ("MAX_ATTEMPTS", "3"), ("BLOCK_MS", "200"))
    }
    cluster = LocalCluster(ClusterPorts.free(), store, var, log_dir=var / "logs", extra_env=fast_takeover)
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        for log in sorted((var / "logs").glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def gateway_channel(cluster):
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        yield channel
