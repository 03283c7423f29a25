"""A process LocalCluster starts (MAAS_STOP_WITH_PARENT=1) stops once its parent is killed, rather than live
on holding ports and cores; without the setting it lives on, as a service under Kubernetes should."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.workers import STOP_WITH_PARENT_ENV

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, signal, sys, time
from pathlib import Path
from shared.workers import stop_with_parent_if_asked
mark = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (mark.write_text("stopped"), os._exit(0)))
stop_with_parent_if_asked()
mark.with_suffix(".pid").write_text(str(os.getpid()))
time.sleep(120)
"""

PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has stopped; only its new parent has not reaped it yet.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def orphan_child(tmp_path: Path, env: dict[str, str]) -> tuple[int, Path]:
    """Starts parent -> child, kills the parent with SIGKILL, and returns the child's pid and its mark file."""
    mark = tmp_path / "mark"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(mark)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env})  # fmt: skip
    deadline = time.monotonic() + 60
    while not mark.with_suffix(".pid").exists():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return int(mark.with_suffix(".pid").read_text()), mark


def test_a_child_asked_to_stop_with_its_parent_stops_when_the_parent_is_killed(tmp_path):
    pid, mark = orphan_child(tmp_path, {STOP_WITH_PARENT_ENV: "1"})
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, "the orphaned child is still running"
        time.sleep(0.1)
    assert mark.read_text() == "stopped"  # by SIGTERM, so a service drains and a trainer requeues its job


def test_without_the_setting_a_child_outlives_its_parent(tmp_path):
    pid, mark = orphan_child(tmp_path, {STOP_WITH_PARENT_ENV: ""})
    try:
        time.sleep(2.5)  # the watch looks every second
        assert alive(pid) and not mark.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
