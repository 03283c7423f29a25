"""WatchJob on a real gateway TrainingService and a real queue Redis: per-tenant caps, one Redis read for all."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2

from gateway.auth import ApiKeys, AuthInterceptor, hash_key
from gateway.settings import GatewaySettings
from gateway.training import TrainingServicer
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from shared.datasets import DatasetStore
from shared.jobs import JobStore
from shared.server import GrpcServer

KEYS = {"alpha": "watch-key-alpha-0123", "beta": "watch-key-beta-45678"}
CAP = 3


@pytest.fixture
async def gateway(queue_redis, tmp_path):
    jobs = JobStore.from_url(queue_redis.url)
    servicer = TrainingServicer(jobs, DatasetStore(tmp_path / "datasets"), 1 << 20, max_watches_per_tenant=CAP)
    keys = ApiKeys([{"tenant": tenant, "sha256": hash_key(key)} for tenant, key in KEYS.items()])
    server = GrpcServer(
        GatewaySettings(port=0),
        lambda s: training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, s),
        ["maas.training.v1.TrainingService"],
        [AuthInterceptor(keys)],
    )
    await server.start()
    await server.set_health(health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel), jobs
    await server.stop()
    await jobs.close()


def bearer(tenant: str):
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


async def queued_job(jobs: JobStore, tenant: str) -> str:
    spec = {"family": "dense", "architecture": "mlp", "hidden_sizes": [8], "optimizer": "adam", "epochs": 1,
            "builtin_dataset": "iris", "output_model": "watched", "tenant": tenant}  # fmt: skip
    return (await jobs.submit("dense", spec, tenant=tenant))[0]


async def open_watch(stub, job_id: str, tenant: str):
    """A WatchJob call that has delivered the job's history and now waits for what comes next."""
    call = stub.WatchJob(t.WatchJobRequest(job_id=job_id), metadata=bearer(tenant), timeout=60)
    first = await call.read()
    assert first.event.state == t.JOB_STATE_QUEUED
    return call


async def test_a_tenant_past_its_watch_cap_gets_resource_exhausted_and_others_do_not(gateway):
    stub, jobs = gateway
    alpha_job, beta_job = await queued_job(jobs, "alpha"), await queued_job(jobs, "beta")
    calls = [await open_watch(stub, alpha_job, "alpha") for _ in range(CAP)]
    extra = stub.WatchJob(t.WatchJobRequest(job_id=alpha_job), metadata=bearer("alpha"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await extra.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_watch_streams_per_tenant={CAP}" in err.value.details()
    beta = await open_watch(stub, beta_job, "beta")  # another tenant's cap is its own
    calls[0].cancel()
    await asyncio.sleep(0.2)  # the cancelled call's slot is freed as its handler ends
    replacement = await open_watch(stub, alpha_job, "alpha")
    for call in [*calls[1:], beta, replacement]:
        call.cancel()


async def test_every_watch_shares_one_blocking_redis_read_and_still_gets_every_event(gateway, queue_redis):
    stub, jobs = gateway
    watched = [(await queued_job(jobs, tenant), tenant) for tenant in KEYS for _ in range(CAP)]
    job_ids = [job_id for job_id, _ in watched]
    client = redis.Redis.from_url(queue_redis.url)
    before = int(client.info("clients")["connected_clients"])
    calls = []
    for job_id, tenant in watched:  # one after the other: only blocking reads can make connections pile up
        calls.append(await open_watch(stub, job_id, tenant))
        await asyncio.sleep(0.3)
    await asyncio.sleep(1.5)  # several rounds of the blocking read
    during = int(client.info("clients")["connected_clients"])
    assert during - before <= 2, f"{during - before} more Redis connections for {len(calls)} watchers"
    for job_id in job_ids:
        await jobs.update(job_id, "epoch 1/1", event={"epoch": 1, "epochs": 1}, state="RUNNING", epoch=1)
        await jobs.update(job_id, "done", state="SUCCEEDED")
    for call in calls:
        rest = []
        while (reply := await call.read()) is not grpc.aio.EOF:
            rest.append(reply.event)
        assert [e.state for e in rest] == [t.JOB_STATE_RUNNING, t.JOB_STATE_SUCCEEDED]
        assert rest[0].epoch == 1 and rest[0].message == "epoch 1/1"
