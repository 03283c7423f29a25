"""ModelStreamInfer's per-call deadlines, rate limits and cancellation (tests/http/stream_infer_checks.py),
in a pytest process of their own: the gateway's Open Inference protos cannot share a process with
tritonclient.grpc's copy of the same package, which other test modules import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stream_infer_checks():
    checks = ROOT / "tests" / "http" / "stream_infer_checks.py"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout
