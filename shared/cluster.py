"""`python -m shared.cluster`: runs the whole cluster on one machine (what `make run` calls).

The process table below is the one place that says what each process runs and with which
settings; the tests start the cluster from it too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.families import FAMILIES
from shared.keyring import LOCAL_KEK_ID, create_kek
from shared.redis_server import CACHE_CONFIG, QUEUE_CONFIG, RedisServer
from shared.workers import STOP_WITH_PARENT_ENV, default_workers, free_port, ready_file


@dataclass
class ProcessSpec:
    name: str
    module: str
    port: int  # its gRPC (and health) port; 0 for a process that serves none, like a trainer
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1  # server processes on the port; with more than one, they write ready files in run_dir
    run_dir: Path | None = None
    # Settings for this machine only (paths under var/), which the manifests leave to their defaults.
    local_env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class ClusterPorts:
    """Every port the local cluster uses: the gateway's (gRPC, metrics and HTTP), the two Redis', and per
    family (from the registry) the service's, its metrics' and its trainer's metrics' (`ports.dense`,
    `ports.dense_metrics`, `ports.dense_trainer_metrics`)."""

    def __init__(
        self,
        gateway: int = 50051,
        gateway_metrics: int = 9464,
        redis: int = 6390,
        redis_queue: int = 6391,
        families: dict[str, int] | None = None,
        pick_free: bool = False,
        gateway_http: int = 8080,
    ) -> None:
        self.gateway = gateway
        self.gateway_http = gateway_http
        self.gateway_metrics = gateway_metrics
        self.redis = redis
        self.redis_queue = redis_queue
        self.families = families or {
            name: port
            for family in FAMILIES
            for name, port in (
                (family.name, family.port),
                (f"{family.name}_metrics", family.metrics_port),
                (f"{family.name}_trainer_metrics", family.trainer_metrics_port),
            )
        }
        # Free ports for extra replicas instead of the fixed +10 steps (tests set it).
        self.pick_free = pick_free
        self._extra: dict[tuple[str, int], int] = {}

    def __getattr__(self, name: str) -> int:
        families = self.__dict__.get("families", {})
        if name in families:
            return families[name]
        raise AttributeError(name)

    @classmethod
    def free(cls) -> ClusterPorts:
        defaults = cls()
        return cls(free_port(), free_port(), free_port(), free_port(),
                   {name: free_port() for name in defaults.families}, pick_free=True,
                   gateway_http=free_port())  # fmt: skip

    def replica(self, name: str, index: int) -> int:
        """The port of replica `index` (0 is the first) for a port name such as "dense" or "dense_metrics"."""
        if index == 0:
            return getattr(self, name)
        if self.pick_free:
            return self._extra.setdefault((name, index), free_port())
        return getattr(self, name) + 10 * index


def process_table(
    ports: ClusterPorts,
    model_store: Path,
    redis_url: str | None,
    queue_redis_url: str,
    var_dir: Path,
    replicas: dict[str, int] | None = None,
    gateway_workers: int | None = None,
) -> list[ProcessSpec]:
    """What runs: the model services (N replicas each), their trainers, and the gateway that fronts them.

    The gateway runs `gateway_workers` processes on its port (default: MAAS_GATEWAY_WORKERS, else one per core).
    """
    store, datasets, checkpoints = str(model_store), str(var_dir / "datasets"), str(var_dir / "checkpoints")

    def keys(prefix: str) -> dict[str, str]:
        """The local KEK (LocalCluster makes it on first start): every store is encrypted at rest."""
        return {f"{prefix}KEYS_DIR": str(var_dir / "keys"), f"{prefix}KEK_ID": LOCAL_KEK_ID}

    counts = {family.name: (replicas or {}).get(family.name, 1) for family in FAMILIES}
    gateway_workers = gateway_workers or int(os.environ.get("MAAS_GATEWAY_WORKERS") or 0) or default_workers()
    gateway_run_dir = var_dir / "run" / "gateway"
    gateway_env = {
        "MAAS_GATEWAY_PORT": str(ports.gateway),
        "MAAS_GATEWAY_METRICS_PORT": str(ports.gateway_metrics),
        "MAAS_GATEWAY_HTTP_PORT": str(ports.gateway_http),
        "MAAS_GATEWAY_QUEUE_REDIS_URL": queue_redis_url,
        "MAAS_GATEWAY_DATASET_DIR": datasets,
        "MAAS_GATEWAY_WORKERS": str(gateway_workers),
    }
    for family in FAMILIES:
        addresses = [f"127.0.0.1:{ports.replica(family.name, i)}" for i in range(counts[family.name])]
        # Several replicas: one static target listing them all, balanced round robin like dns:/// in Kubernetes.
        target = addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)
        gateway_env[f"MAAS_GATEWAY_{family.name.upper()}_TARGET"] = target
    if redis_url:
        gateway_env["MAAS_GATEWAY_REDIS_URL"] = redis_url
    specs = []
    for family in FAMILIES:
        prefix = family.env_prefix
        for i in range(counts[family.name]):
            port = ports.replica(family.name, i)
            env = {
                f"{prefix}PORT": str(port),
                f"{prefix}METRICS_PORT": str(ports.replica(f"{family.name}_metrics", i)),
                f"{prefix}MODEL_STORE": store,
                # Model events (new versions, loads, pins) travel on the job queue's Redis.
                f"{prefix}EVENTS_REDIS_URL": queue_redis_url,
            }
            name = family.name if i == 0 else f"{family.name}-{i + 1}"
            specs.append(ProcessSpec(name, family.module, port, env, local_env=keys(prefix)))
    for family in FAMILIES:
        prefix = f"{family.env_prefix}TRAINER"
        env = {
            f"{prefix}_QUEUE_REDIS_URL": queue_redis_url,
            f"{prefix}_MODEL_STORE": store,
            f"{prefix}_DATASET_DIR": datasets,
            f"{prefix}_CHECKPOINT_DIR": checkpoints,
            f"{prefix}_METRICS_PORT": str(getattr(ports, f"{family.name}_trainer_metrics")),
            # The services of the families its trainer calls (gnn: nlp embeddings of items' texts).
            **{f"{prefix}_{other.upper()}_TARGET": gateway_env[f"MAAS_GATEWAY_{other.upper()}_TARGET"]
               for other in family.trainer_uses},  # fmt: skip
        }
        specs.append(ProcessSpec(f"{family.name}-trainer", family.trainer_module, 0, env, local_env=keys(f"{prefix}_")))
    specs.append(
        ProcessSpec(
            "gateway", "gateway", ports.gateway, gateway_env, gateway_workers, gateway_run_dir,
            {"MAAS_GATEWAY_RUN_DIR": str(gateway_run_dir), **keys("MAAS_GATEWAY_")},
        )
    )  # fmt: skip
    return specs


def health_status(target: str, timeout_s: float = 1.0) -> int:
    """The overall health status a server reports, or UNKNOWN when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            return reply.status
        except grpc.RpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN


class LocalCluster:
    """Starts Redis (unless REDIS_URL is given) and every process of the table, as child processes."""

    def __init__(
        self,
        ports: ClusterPorts,
        model_store: Path,
        var_dir: Path,
        redis_url: str | None = None,
        log_dir: Path | None = None,
        queue_redis_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
        gateway_workers: int | None = None,
    ) -> None:
        self.ports = ports
        self.var_dir = Path(var_dir)
        self.log_dir = log_dir
        self.redis = None if redis_url else RedisServer(ports.redis, self.var_dir / "redis-cache", CACHE_CONFIG)
        self.redis_url = redis_url or self.redis.url
        self.queue_redis = (
            None if queue_redis_url else RedisServer(ports.redis_queue, self.var_dir / "redis-queue", QUEUE_CONFIG)
        )
        self.queue_redis_url = queue_redis_url or self.queue_redis.url
        self.extra_env = extra_env or {}
        self.specs = {
            spec.name: spec
            for spec in process_table(
                ports, Path(model_store), self.redis_url, self.queue_redis_url, self.var_dir, replicas, gateway_workers
            )
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, timeout_s: float = 180.0) -> None:
        if create_kek(self.var_dir / "keys", LOCAL_KEK_ID):
            print(f"made the local key-encryption key {self.var_dir / 'keys' / LOCAL_KEK_ID}", flush=True)
        if self.redis is not None:
            self.redis.start()
        if self.queue_redis is not None:
            self.queue_redis.start()
        for name in self.specs:
            self.start_process(name)
        for name in self.specs:
            self.wait_serving(name, timeout_s)

    def start_process(self, name: str) -> None:
        spec = self.specs[name]
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        # Each process stops once this one is gone (a killed test run, a killed `make run`), not lives on.
        env = {**os.environ, **spec.env, **spec.local_env, STOP_WITH_PARENT_ENV: "1", **self.extra_env}
        # Its own process group, so that a process that will not stop is killed with its workers.
        self.processes[name] = subprocess.Popen(
            spec.command, env=env, stdout=output, stderr=output, start_new_session=True
        )

    def wait_serving(self, name: str, timeout_s: float = 180.0) -> None:
        spec, process = self.specs[name], self.processes[name]
        if not spec.port:  # no health endpoint: it is up while it runs
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}{self._log_hint(name)}")
            return
        deadline = time.monotonic() + timeout_s
        while health_status(spec.target) != health_pb2.HealthCheckResponse.SERVING or not self._all_workers_ready(spec):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} before serving{self._log_hint(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not report SERVING within {timeout_s}s{self._log_hint(name)}")
            time.sleep(0.2)

    @staticmethod
    def _all_workers_ready(spec: ProcessSpec) -> bool:
        """Health reaches one worker only; the others say they serve through their ready files."""
        return spec.workers <= 1 or all(ready_file(spec.run_dir, i).exists() for i in range(spec.workers))

    def _log_hint(self, name: str, tail_lines: int = 30) -> str:
        """Where the process logged, and the end of it: a CI run keeps only what the error says."""
        if not self.log_dir:
            return ""
        path = self.log_dir / f"{name}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-tail_lines:]
        except OSError:
            tail = []
        return f"; see {path}" + ("; it ends:\n" + "\n".join(tail) if tail else "")

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop_process(name)
        if self.redis is not None:
            self.redis.stop()
        if self.queue_redis is not None:
            self.queue_redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the maas cluster locally.")
    parser.add_argument("--model-store", type=Path, default=Path("var/models"))
    parser.add_argument("--var-dir", type=Path, default=Path("var"))
    parser.add_argument("--replicas", type=int, default=1, help="replicas of each model service")
    args = parser.parse_args()

    cluster = LocalCluster(
        ClusterPorts(),
        args.model_store,
        args.var_dir,
        os.environ.get("REDIS_URL"),
        queue_redis_url=os.environ.get("QUEUE_REDIS_URL"),
        replicas={family.name: args.replicas for family in FAMILIES},
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        cluster.start()
        print_endpoints(cluster)
        # The example is a client like any other: its own process, not an import of the client code.
        subprocess.run([sys.executable, "-m", "clients.example", cluster.specs["gateway"].target], check=False)
        print(f"\nmaasctl: .venv/bin/maasctl --target {cluster.specs['gateway'].target} models list", flush=True)
        print("\nCluster is up. Ctrl-C stops every process it started.", flush=True)
        stop.wait()
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave orphans behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("\nstopping…", flush=True)
        cluster.stop()


def print_endpoints(cluster: LocalCluster) -> None:
    print("\nmaas is serving:", flush=True)
    for name, spec in cluster.specs.items():
        if not spec.port:
            print(f"  {name:<13} python -m {spec.module}  (trains queued {name.split('-')[0]} jobs)")
            continue
        role = "public endpoint" if name == "gateway" else "internal"
        workers = f", {spec.workers} workers" if spec.workers > 1 else ""
        print(f"  {name:<13} grpc://{spec.target}  ({role}{workers})")
        if name == "gateway" and cluster.ports.gateway_http:
            http = f"http://127.0.0.1:{cluster.ports.gateway_http}"
            print(f"  {'gateway':<13} {http}  (KServe v2 REST /v2, OpenAI /v1, console {http}/console)")
    metrics = ", ".join(
        f"{name} :{getattr(cluster.ports, f'{name}_metrics')}" for name in ("gateway", *(f.name for f in FAMILIES))
    )
    print(f"  metrics       http://127.0.0.1:<port>/metrics  (Prometheus: {metrics})")
    print(f"  redis         {cluster.redis_url}  (result cache: LRU)")
    print(f"  redis         {cluster.queue_redis_url}  (job queue: AOF, noeviction)")
    print(f"  keys          {cluster.var_dir / 'keys'}  (KEK {LOCAL_KEK_ID}: models and data sets encrypted at rest)",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
