"""The C++ client (clients/cpp), built with CMake from `make stubs-cpp`, runs the client scenario
against the suite's gateway. Without its toolchain the test skips, naming the Debian packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.clients.scenario import build, check, run_client

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build" / "cpp" / "maas_scenario"
TOOLS = {
    "protoc": "protobuf-compiler",
    "grpc_cpp_plugin": "protobuf-compiler-grpc",
    "cmake": "cmake",
    "pkg-config": "pkg-config",
}


def missing_toolchain() -> list[str]:
    """What the build needs and this machine lacks, each as 'what (Debian package)'."""
    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not any(shutil.which(compiler) for compiler in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        missing.append("a C++ compiler (g++)")
    if shutil.which("pkg-config") is not None:
        for module in ("grpc++", "protobuf"):
            if subprocess.run(["pkg-config", "--exists", module], check=False).returncode != 0:
                missing.append(f"pkg-config module {module} (libgrpc++-dev)")
    return missing


MISSING = missing_toolchain()
# Decided at collection, so that a skip does not first start the session's cluster.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"the C++ client needs {', '.join(MISSING)}: clients/install-toolchains.sh installs them",
    ),
]


@pytest.fixture(scope="module")
def cpp_client() -> Path:
    build(["make", "--no-print-directory", "client-cpp"], cwd=ROOT)  # about 80 s from scratch on 2 cores
    return BINARY


def test_cpp_client_runs_the_scenario(cluster, cpp_client, karate_labels):
    stdout = run_client([str(cpp_client), cluster.specs["gateway"].target, uuid.uuid4().hex])
    check(stdout, karate_labels)
