"""Proto hygiene with buf (lint, and breaking changes against main), and stubs for every language."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.clients.scenario import build

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"

needs_npm = pytest.mark.skipif(
    shutil.which("npm") is None, reason="npm not found: buf is the npm package @bufbuild/buf (install Node.js and npm)"
)


@pytest.fixture(scope="module")
def buf() -> Path:
    build(["make", "--no-print-directory", "node-deps"], cwd=ROOT)
    return BUF


def run_buf(buf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(buf), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@needs_npm
def test_buf_lint_is_clean(buf):
    done = run_buf(buf, "lint")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_npm
def test_no_breaking_change_against_the_released_contract(buf):
    # protos/released.json is the image of the released contract (buf build -o, at the release),
    # committed, so the check bites on main too instead of comparing main with itself.
    done = run_buf(buf, "breaking", "--against", "protos/released.json")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_npm
@pytest.mark.parametrize(
    ("proto", "old", "new", "complaint"),
    [
        ("maas/dense/v1/dense.proto", "int64 model_version = 2;", "string model_version = 2;",
         'changed type from "int64" to "string"'),
        ("maas/models/v1/models.proto", "  string family = 1;\n", "  int32 family = 1;\n",
         'changed type from "string" to "int32"'),
    ],
)  # fmt: skip
def test_a_released_field_that_changes_type_fails_the_check(buf, tmp_path, proto, old, new, complaint):
    changed = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", changed)
    path = changed / proto
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    done = run_buf(buf, "breaking", str(changed), "--against", str(ROOT / "protos" / "released.json"))
    assert done.returncode != 0
    assert complaint in done.stdout


NEEDED = {
    "protoc": "protobuf-compiler",
    "grpc_cpp_plugin": "protobuf-compiler-grpc",
    "grpc_java_plugin": "protobuf-compiler-grpc-java-plugin",
    "protoc-gen-go": "protoc-gen-go",
    "protoc-gen-go-grpc": "protoc-gen-go-grpc",
    "npm": "npm",
}
MISSING = [f"{tool} (Debian package {package})" for tool, package in NEEDED.items() if shutil.which(tool) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"make stubs needs {', '.join(MISSING)}: clients/install-toolchains.sh")
def test_make_stubs_writes_every_language():
    build(["make", "--no-print-directory", "stubs"], cwd=ROOT)
    stubs = ROOT / "build" / "stubs"
    for path in (
        "ts/maas/dense/v1/dense.ts",
        "go/maas/dense/v1/dense_grpc.pb.go",
        "cpp/maas/dense/v1/dense.grpc.pb.h",
        "java/dev/maas/dense/v1/DenseServiceGrpc.java",
        "java/dev/maas/training/v1/TrainingServiceGrpc.java",
        "go/inference/open_inference_grpc.pb.go",
    ):
        assert (stubs / path).is_file(), f"make stubs did not write {path}"
    # The proto options name each language's package.
    assert "package dev.maas.dense.v1;" in (stubs / "java/dev/maas/dense/v1/DenseServiceGrpc.java").read_text()
    assert "package densev1" in (stubs / "go/maas/dense/v1/dense.pb.go").read_text()


JAVA_MISSING = [
    what
    for what, present in (
        ("javac (Debian package default-jdk-headless)", shutil.which("javac")),
        ("grpc-java (Debian package libgrpc-java)", Path("/usr/share/java/grpc-stub.jar").is_file()),
        ("protobuf-java (Debian package libprotobuf-java)", Path("/usr/share/java/protobuf.jar").is_file()),
        ("grpc_java_plugin (Debian package protobuf-compiler-grpc-java-plugin)", shutil.which("grpc_java_plugin")),
    )
    if not present
]


@pytest.mark.skipif(bool(JAVA_MISSING), reason=f"needs {', '.join(JAVA_MISSING)}: clients/install-toolchains.sh")
def test_the_java_stubs_compile():
    build(["make", "--no-print-directory", "stubs-java-compile"], cwd=ROOT)
    classes = ROOT / "build" / "java" / "dev" / "maas"
    assert (classes / "dense" / "v1" / "DenseServiceGrpc$DenseServiceBlockingStub.class").is_file()
    assert (classes / "training" / "v1" / "TrainingServiceGrpc.class").is_file()
