"""The HTTP front's translations (tests/http/translation_checks.py) and the Open Inference split of graph
classification's inputs (tests/http/open_inference_graph_checks.py), in a pytest process of their own.

They import the gateway's Open Inference protos, which protobuf will not load beside tritonclient.grpc's
copy of the same package that other test modules import, so they run in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_http_translations():
    checks = [ROOT / "tests" / "http" / name for name in ("translation_checks.py", "open_inference_graph_checks.py")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, checks)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
