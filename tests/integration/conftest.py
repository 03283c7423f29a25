"""Fixtures of the integration tests: a real queue Redis per test module, and a job store on it."""

from __future__ import annotations

import pytest
import redis

from shared.jobs import JobStore
from shared.redis_server import QUEUE_CONFIG, RedisServer
from shared.workers import free_port


@pytest.fixture(scope="module")
def queue_redis(tmp_path_factory):
    """A Redis configured as the job queue's (AOF, never evicts), started for the module's tests."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("queue"), QUEUE_CONFIG)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def jobs(queue_redis):
    """A JobStore on the module's queue Redis, emptied first."""
    redis.Redis.from_url(queue_redis.url).flushall()
    store = JobStore.from_url(queue_redis.url)
    yield store
    await store.close()
