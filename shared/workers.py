"""Several processes serving one port: a supervisor and its workers.

One grpc.aio server runs on one event loop, so one process uses about one core. With
`workers` > 1, `python -m gateway` (or a model service) becomes a supervisor: it starts that
many copies of itself as child processes, each a whole server with its own event loop,
channels, Redis pool and model sessions, bound to the same port with SO_REUSEPORT, so the
kernel spreads connections over them (gRPC's own multiprocessing example does the same).

The supervisor
- serves /metrics for all of them, from prometheus_client's multiprocess files;
- passes SIGTERM on, so every worker drains its calls in flight, and exits once they have;
- restarts a worker that dies while serving, and stops everything when one dies while
  starting: a bad setting (a device that is not there, a port in use) would otherwise
  restart forever.

Workers are new interpreters (spawned, never forked): gRPC's C core does not survive a fork.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import DeviceUnavailableError

log = logging.getLogger(__name__)

WORKER_INDEX_ENV = "MAAS_WORKER_INDEX"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STOP_WITH_PARENT_ENV = "MAAS_STOP_WITH_PARENT"
# sysexits' EX_CONFIG: the process cannot run as configured; restarting it will not help.
EXIT_CONFIG = 78
# A worker that dies sooner than this after its start is failing to start, not crashing.
STARTUP_S = 20.0
MAX_DEFAULT_WORKERS = 8


def default_workers(cap: int = MAX_DEFAULT_WORKERS) -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset sets), capped."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, cap))


def worker_index() -> int | None:
    """This process's index among its supervisor's workers, or None when it is not a worker."""
    value = os.environ.get(WORKER_INDEX_ENV)
    return int(value) if value is not None else None


def ready_file(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / f"ready-{index}"


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on, for a server started later.

    Taken below the kernel's ephemeral range where there is room: a port the kernel hands out (bind to 0)
    may be taken as the local end of some outgoing connection before the server binds it, and then the
    server cannot start. Ports already handed out by this process are not handed out again."""
    low = _ephemeral_low()
    if low > 12000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(10000, low)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("0.0.0.0" if host in ("", "0.0.0.0", "127.0.0.1") else host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class WorkerGroup:
    """`workers` copies of `python -m module`, sharing `port`, under this process."""

    name: str
    module: str
    env_prefix: str
    workers: int
    port: int
    host: str = "127.0.0.1"
    metrics_port: int = 0
    shutdown_grace_s: float = 10.0
    run_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    _children: dict[int, subprocess.Popen] = field(default_factory=dict, repr=False)
    _started: dict[int, float] = field(default_factory=dict, repr=False)

    def run(self) -> int:
        """Runs the workers until SIGTERM or SIGINT (0), or until one fails to start (its exit code)."""
        run_dir = Path(self.run_dir or tempfile.mkdtemp(prefix=f"maas-{self.name}-"))
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*run_dir.glob("*.db"), *run_dir.glob("ready-*")]:
            stale.unlink(missing_ok=True)
        port = self.port or free_port(self.host if self.host != "0.0.0.0" else "127.0.0.1")
        env = {
            **os.environ,
            f"{self.env_prefix}WORKERS": "1",
            f"{self.env_prefix}PORT": str(port),
            f"{self.env_prefix}METRICS_PORT": "0",  # the supervisor serves every worker's metrics
            f"{self.env_prefix}RUN_DIR": str(run_dir),
            MULTIPROC_ENV: str(run_dir),
            **self.extra_env,
        }
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
        if self.metrics_port:
            _serve_multiprocess_metrics(self.metrics_port, self.host, run_dir)
        log.info("%s: %d workers on %s:%d", self.name, self.workers, self.host, port)
        for index in range(self.workers):
            self._spawn(index, env)
        try:
            while not stop.wait(0.2):
                failed = self._reap(env, run_dir)
                if failed is not None:
                    return failed
            return 0
        finally:
            self._stop_all(run_dir)

    def _spawn(self, index: int, env: dict[str, str]) -> None:
        child = subprocess.Popen([sys.executable, "-m", self.module], env={**env, WORKER_INDEX_ENV: str(index)})
        self._children[index] = child
        self._started[index] = time.monotonic()

    def _reap(self, env: dict[str, str], run_dir: Path) -> int | None:
        """Restarts workers that died while serving; returns an exit code when one failed to start."""
        for index, child in list(self._children.items()):
            code = child.poll()
            if code is None:
                continue
            _mark_dead(child.pid, run_dir)
            ready_file(run_dir, index).unlink(missing_ok=True)
            if code == EXIT_CONFIG or time.monotonic() - self._started[index] < STARTUP_S:
                log.error("%s worker %d exited with %d while starting; stopping the others", self.name, index, code)
                del self._children[index]
                return code or 1
            log.error("%s worker %d (pid %d) exited with %d; starting it again", self.name, index, child.pid, code)
            self._spawn(index, env)
        return None

    def _stop_all(self, run_dir: Path) -> None:
        """SIGTERM to every worker, so each drains its calls in flight; SIGKILL after the grace period."""
        for child in self._children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace_s + 5
        for child in self._children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s worker pid %d did not stop in time; killing it", self.name, child.pid)
                child.kill()
                child.wait()
            _mark_dead(child.pid, run_dir)
        self._children.clear()


def _serve_multiprocess_metrics(port: int, host: str, run_dir: Path) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(run_dir))
    start_http_server(port, addr=host, registry=registry)


def _mark_dead(pid: int, run_dir: Path) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(run_dir))


def stop_with_parent_if_asked() -> None:
    """With MAAS_STOP_WITH_PARENT=1 (LocalCluster sets it: `make run`, the tests), stops this process once the
    process that started it is gone, killed or out of memory, instead of living on holding ports and cores."""
    if os.environ.get(STOP_WITH_PARENT_ENV) == "1":
        _stop_when_orphaned()


def _stop_when_orphaned() -> None:
    """A worker whose supervisor died (SIGKILL, OOM) stops itself rather than serve on unsupervised."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the supervisor (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def run_server_process(process: str, module: str, settings: Any, serve: Callable[[Any], Awaitable[None]]) -> None:
    """What every server's `main` does: supervise workers, or be one server, stopping with the reason
    when its configuration cannot run here."""
    from shared.logs import configure_logging
    from shared.tracing import configure_tracing

    index = worker_index()
    configure_logging(process if index is None else f"{process}#{index}", settings.log_level, settings.log_format)
    if index is None:  # a supervisor too: it passes the SIGTERM on to its workers
        stop_with_parent_if_asked()
    workers = settings.workers or default_workers()
    if workers > 1 and index is None:
        prefix = settings.model_config["env_prefix"]
        extra_env = {}
        if getattr(settings, "gpu_memory_limit_mb", 0):  # the service's GPU memory cap, shared by its workers
            extra_env[f"{prefix}GPU_MEMORY_LIMIT_MB"] = str(max(1, settings.gpu_memory_limit_mb // workers))
        group = WorkerGroup(
            process,
            module,
            prefix,
            workers,
            settings.port,
            settings.host,
            settings.metrics_port,
            settings.shutdown_grace_s,
            settings.run_dir,
            extra_env,
        )
        sys.exit(group.run())
    if index is not None:
        _stop_when_orphaned()
    configure_tracing(process, settings.tracing, settings.otlp_endpoint)
    try:
        asyncio.run(serve(settings))
    except DeviceUnavailableError as exc:
        log.critical("%s cannot start: %s", process, exc)
        sys.exit(EXIT_CONFIG)
