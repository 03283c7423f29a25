"""Fixtures shared by every test: the default model store and a whole cluster on free ports.

The cluster runs encrypted, as `make run` does: its store is a copy of the default models sealed
under a KEK of its own (LocalCluster's local one), so every e2e test exercises the sealed store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest

from shared.cluster import ClusterPorts, LocalCluster
from shared.keyring import LOCAL_KEK_ID, Keyring, create_kek
from shared.model_store import ModelStore
from tests.stores import copy_store, plain_defaults

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def graph_plaintext_dir():
    """Sealed graphs are decrypted into memory-only storage (/dev/shm) that gnn services share: every service
    the tests start uses this session's own directory, removed at the end, so test stores leave nothing there."""
    plaintext = Path("/dev/shm") / f"maas-graphs-test-{os.getpid()}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAAS_GNN_GRAPH_PLAINTEXT_DIR", str(plaintext) if plaintext.parent.is_dir() else "none")
        yield plaintext
    shutil.rmtree(plaintext, ignore_errors=True)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> ModelStore:
    """A plain copy of the default models (`make models` seals them in var/models; built here too when
    pytest runs on its own): tests copy it into stores of their own and start services without keys."""
    return plain_defaults(tmp_path_factory.mktemp("defaults") / "models")


@pytest.fixture(scope="session")
def cluster(model_store, tmp_path_factory):
    """Redis, the three model services and the gateway, as real processes on free ports, on a sealed store."""
    var = tmp_path_factory.mktemp("cluster")
    # LocalCluster's local KEK, made first so that the store's copy is sealed with it.
    create_kek(var / "keys", LOCAL_KEK_ID)
    keyring = Keyring(var / "keys", LOCAL_KEK_ID)
    # A sealed copy: training jobs and admin calls in the tests write versions and pins.
    store = var / "models"
    copy_store(model_store, ModelStore(store, keyring))
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
    # Tests read this cluster's store from this process too (the versions a job wrote, by its source):
    # a ModelStore made on it without keys gets the cluster's, as its services have them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelStore, "__init__", _with_keys_under(var, keyring))
        yield cluster
    cluster.stop()


def _with_keys_under(root: Path, cluster_keyring: Keyring):
    plain_init = ModelStore.__init__

    def init(self, store_root, keyring=None):
        under = Path(store_root).resolve().is_relative_to(root.resolve())
        plain_init(self, store_root, keyring or (cluster_keyring if under else None))

    return init


@pytest.fixture(scope="session")
def gateway_channel(cluster):
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        yield channel
