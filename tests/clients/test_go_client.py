"""The Go client (clients/go), built from protoc-gen-go stubs, runs the client scenario against the suite's gateway."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests.clients.scenario import build, check, run_client

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build" / "go" / "bin" / "maas-scenario"
NEEDED = {
    "go": "golang-go",
    "protoc": "protobuf-compiler",
    "protoc-gen-go": "protoc-gen-go",
    "protoc-gen-go-grpc": "protoc-gen-go-grpc",
}
MISSING = [f"{tool} (Debian package {package})" for tool, package in NEEDED.items() if shutil.which(tool) is None]
if not Path("/usr/share/gocode/src/google.golang.org/grpc").is_dir():
    MISSING.append("grpc-go (Debian package golang-google-grpc-dev)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING), reason=f"the Go client needs {', '.join(MISSING)}: clients/install-toolchains.sh"
    ),
]


@pytest.fixture(scope="module")
def go_client() -> Path:
    build(["make", "--no-print-directory", "client-go"], cwd=ROOT)
    return BINARY


def test_go_client_runs_the_scenario(cluster, go_client, karate_labels):
    stdout = run_client([str(go_client), cluster.specs["gateway"].target, uuid.uuid4().hex])
    check(stdout, karate_labels)
