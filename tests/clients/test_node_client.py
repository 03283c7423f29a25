"""The Node/TypeScript client (clients/node), built from ts-proto stubs, runs the client scenario
against the suite's gateway. Without Node, npm or protoc the test skips, saying what to install."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.clients.scenario import build, check, run_client

ROOT = Path(__file__).resolve().parents[2]
# tsconfig.json keeps the repo layout under its outDir, clients/node/build/node.
SCENARIO_JS = ROOT / "clients" / "node" / "build" / "node" / "clients" / "node" / "src" / "scenario.js"
PROTOC = os.environ.get("PROTOC", "protoc")  # as in the Makefile

# Decided at collection, so that a skip does not first start the session's cluster.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None,
        reason="node or npm not found: install Node.js 18 or newer with npm to build the Node client",
    ),
    pytest.mark.skipif(
        shutil.which(PROTOC) is None,
        reason=f"{PROTOC} not found: install the Debian package protobuf-compiler (clients/install-toolchains.sh)",
    ),
]


@pytest.fixture(scope="module")
def scenario_js() -> Path:
    build(["make", "--no-print-directory", "client-node"], cwd=ROOT)  # npm install, ts-proto, tsc
    return SCENARIO_JS


def test_node_client_runs_the_scenario(cluster, scenario_js, karate_labels):
    command = ["node", "--enable-source-maps", str(scenario_js), cluster.specs["gateway"].target, uuid.uuid4().hex]
    check(run_client(command), karate_labels)
