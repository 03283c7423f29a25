"""Explanation jobs' results expire: a job submitted with a result TTL keeps its record, events, result
and idempotency key for that long after it finishes, on a real queue Redis; training jobs are kept."""

from __future__ import annotations

import asyncio

import pytest
import redis

from shared.errors import NotFoundError
from shared.jobs import EXPLAIN, events_key, idempotency_record_key, job_key, result_key


def job_keys(job_id: str, tenant: str, idempotency_key: str) -> list[str]:
    return [job_key(job_id), events_key(job_id), result_key(job_id), idempotency_record_key(tenant, idempotency_key)]


async def test_a_finished_explanation_expires_after_its_ttl_and_is_then_not_found(jobs, queue_redis):
    client = redis.Redis.from_url(queue_redis.url)
    spec = {"kind": EXPLAIN, "model_name": "digits-mlp"}
    job_id, _ = await jobs.submit("dense", spec, "explain-1", "acme", result_ttl_s=3600)
    keys = job_keys(job_id, "acme", "explain-1")
    await jobs.update(job_id, "running", state="RUNNING")
    assert client.ttl(job_key(job_id)) == -1  # a job still running never expires
    await jobs.update(job_id, "explained", state="SUCCEEDED", result=b"response")
    ttls = [client.ttl(key) for key in keys]
    assert all(3590 <= ttl <= 3600 for ttl in ttls), dict(zip(keys, ttls, strict=True))

    short, _ = await jobs.submit("dense", spec, "explain-2", "acme", result_ttl_s=0.3)
    await jobs.update(short, "explained", state="SUCCEEDED", result=b"response")
    assert await jobs.result(short) == b"response"
    for _ in range(100):  # Redis expires it 0.3 s after it finished
        if not any(client.exists(key) for key in job_keys(short, "acme", "explain-2")):
            break
        await asyncio.sleep(0.05)
    with pytest.raises(NotFoundError):
        await jobs.get(short, "acme")
    assert await jobs.result(short) is None
    assert [record["job_id"] for record in await jobs.list(tenant="acme")] == [job_id]  # left the index too
    again, created = await jobs.submit("dense", spec, "explain-2", "acme", result_ttl_s=0.3)
    assert created and again != short  # its idempotency key expired with it: a new job


async def test_failed_and_cancelled_explanations_expire_too_and_training_jobs_never(jobs, queue_redis):
    client = redis.Redis.from_url(queue_redis.url)
    failed, _ = await jobs.submit("dense", {"kind": EXPLAIN}, "", "acme", result_ttl_s=60)
    await jobs.update(failed, "boom", state="FAILED", error="boom")
    cancelled, _ = await jobs.submit("dense", {"kind": EXPLAIN}, "", "acme", result_ttl_s=60)
    await jobs.request_cancel(cancelled, "acme")  # cancelled while queued: finished at once
    training, _ = await jobs.submit("dense", {"epochs": 1}, "train-1", "acme")
    await jobs.update(training, "trained", state="SUCCEEDED", model_version=1)
    assert 0 < client.ttl(job_key(failed)) <= 60 and 0 < client.ttl(events_key(failed)) <= 60
    assert 0 < client.ttl(job_key(cancelled)) <= 60
    assert [client.ttl(key) for key in job_keys(training, "acme", "train-1") if client.exists(key)] == [-1, -1, -1]
