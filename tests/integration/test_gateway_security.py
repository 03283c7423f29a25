"""TLS, mutual TLS, API keys and tenant isolation on a real gateway server with a real queue Redis."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import ApiKeys, AuthInterceptor, hash_key, server_credentials
from gateway.settings import GatewaySettings
from gateway.training import TrainingServicer
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from maas_client import Client, Unauthenticated
from shared.cluster import free_port
from shared.datasets import DatasetStore
from shared.jobs import JobStore
from shared.server import GrpcServer

KEYS = {"alpha": "key-alpha-0123456789", "beta": "key-beta-9876543210"}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost, a client certificate, and a client from another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found: it makes the test certificates (Debian package openssl)")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-subj", f"/CN={ca}", "-days", "2", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


async def start_gateway(pki: Path, queue_redis, tmp_path: Path, mutual: bool):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": t, "sha256": hash_key(k)} for t, k in KEYS.items()]}))
    settings = GatewaySettings(port=0, api_keys_file=keys, dataset_dir=tmp_path / "datasets")
    jobs = JobStore.from_url(queue_redis.url)
    servicer = TrainingServicer(jobs, DatasetStore(settings.dataset_dir), 1 << 20)
    credentials = server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt" if mutual else None)
    server = GrpcServer(
        settings,
        lambda s: training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, s),
        ["maas.training.v1.TrainingService"],
        [AuthInterceptor(ApiKeys.from_file(keys))],
        credentials,
        health_port=free_port(),
    )
    await server.start()
    await server.set_health(health_pb2.HealthCheckResponse.SERVING)
    return server, jobs


@pytest.fixture
async def mtls_gateway(pki, queue_redis, tmp_path):
    server, jobs = await start_gateway(pki, queue_redis, tmp_path, mutual=True)
    yield server
    await server.stop()
    await jobs.close()


def channel(server, pki: Path, cert: str | None = "client", ca: str = "ca"):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / f"{ca}.crt").read_bytes(),
        private_key=(pki / f"{cert}.key").read_bytes() if cert else None,
        certificate_chain=(pki / f"{cert}.crt").read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(f"localhost:{server.port}", credentials)


def bearer(tenant: str):
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


async def list_jobs(ch, metadata=()):
    stub = training_pb2_grpc.TrainingServiceStub(ch)
    return await stub.ListJobs(t.ListJobsRequest(), timeout=5, metadata=metadata)


async def test_mutual_tls_accepts_a_client_the_ca_signed(mtls_gateway, pki):
    async with channel(mtls_gateway, pki) as ch:
        assert isinstance(await list_jobs(ch, bearer("alpha")), t.ListJobsResponse)


@pytest.mark.parametrize("cert", ["rogue", None], ids=["other CA", "no client certificate"])
async def test_mutual_tls_refuses_other_clients(mtls_gateway, pki, cert):
    async with channel(mtls_gateway, pki, cert=cert) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await list_jobs(ch, bearer("alpha"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_is_refused_on_the_tls_port(mtls_gateway):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mtls_gateway.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await list_jobs(ch, bearer("alpha"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_works_without_credentials_on_the_plaintext_health_port(mtls_gateway):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mtls_gateway.health_port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_one_way_tls_without_client_certificates(pki, queue_redis, tmp_path):
    server, jobs = await start_gateway(pki, queue_redis, tmp_path, mutual=False)
    try:
        async with channel(server, pki, cert=None) as ch:
            assert isinstance(await list_jobs(ch, bearer("beta")), t.ListJobsResponse)
    finally:
        await server.stop()
        await jobs.close()


@pytest.mark.parametrize(
    ("metadata", "details"),
    [
        ((), "missing API key"),
        ((("authorization", "Bearer not-a-key"),), "unknown API key"),
        ((("authorization", "Basic abc"),), "expected 'Bearer <key>'"),
    ],
)
async def test_calls_without_a_valid_key_are_unauthenticated(mtls_gateway, pki, metadata, details):
    async with channel(mtls_gateway, pki) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await list_jobs(ch, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details in err.value.details()


async def test_a_tenant_sees_only_its_own_jobs_and_data_sets(mtls_gateway, pki):
    async with channel(mtls_gateway, pki) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)

        def upload():
            yield t.UploadDatasetRequest(info=t.DatasetInfo(name="mine", family=t.FAMILY_NLP,
                                                            format=t.DATASET_FORMAT_JSONL))  # fmt: skip
            yield t.UploadDatasetRequest(chunk=b'{"text": "good", "label": "p"}\n{"text": "bad", "label": "n"}\n' * 3)

        dataset = (await stub.UploadDataset(upload(), timeout=10, metadata=bearer("alpha"))).dataset
        request = t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", dataset_id=dataset.dataset_id,
                                     output_model="alpha-model", idempotency_key="same-key")  # fmt: skip
        job = (await stub.SubmitJob(request, timeout=10, metadata=bearer("alpha"))).job

        assert (await stub.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=5, metadata=bearer("alpha"))).job
        for call in (
            stub.GetDataset(t.GetDatasetRequest(dataset_id=dataset.dataset_id), timeout=5, metadata=bearer("beta")),
            stub.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=5, metadata=bearer("beta")),
            stub.CancelJob(t.CancelJobRequest(job_id=job.job_id), timeout=5, metadata=bearer("beta")),
            stub.SubmitJob(request, timeout=5, metadata=bearer("beta")),  # alpha's data set
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=5, metadata=bearer("beta")):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        alpha_jobs = {j.job_id for j in (await list_jobs(ch, bearer("alpha"))).jobs}
        beta_jobs = {j.job_id for j in (await list_jobs(ch, bearer("beta"))).jobs}
        assert job.job_id in alpha_jobs and job.job_id not in beta_jobs
        datasets = {}
        for tenant in ("alpha", "beta"):
            listing = await stub.ListDatasets(t.ListDatasetsRequest(), timeout=5, metadata=bearer(tenant))
            datasets[tenant] = [d.dataset_id for d in listing.datasets]
        assert datasets == {"alpha": [dataset.dataset_id], "beta": []}

        # Idempotency keys are per tenant: beta's "same-key" is beta's own job.
        beta_request = t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", builtin_dataset="sentiment",
                                          output_model="beta-model", idempotency_key="same-key")  # fmt: skip
        beta = await stub.SubmitJob(beta_request, timeout=5, metadata=bearer("beta"))
        assert beta.created and beta.job.job_id != job.job_id


async def test_the_sdk_speaks_mutual_tls_and_sends_its_api_key(mtls_gateway, pki):
    def list_jobs_with(api_key: str):
        with Client(
            f"localhost:{mtls_gateway.port}",
            api_key=api_key,
            root_certificates=pki / "ca.crt",
            certificate_chain=pki / "client.crt",
            private_key=pki / "client.key",
            max_attempts=1,
        ) as client:
            return client.training.list()

    # The blocking SDK runs in a thread: the server shares this test's event loop.
    assert isinstance(await asyncio.to_thread(list_jobs_with, KEYS["alpha"]), list)
    with pytest.raises(Unauthenticated, match="unknown API key"):
        await asyncio.to_thread(list_jobs_with, "not-a-key")


async def test_maasctl_connects_with_mutual_tls_and_an_api_key(mtls_gateway, pki):
    maasctl = Path(sys.executable).parent / "maasctl"

    async def jobs_list(api_key: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            str(maasctl), "--target", f"localhost:{mtls_gateway.port}", "--ca", str(pki / "ca.crt"),
            "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key"), "--api-key", api_key,
            "jobs", "list", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, (out + err).decode()

    code, output = await jobs_list(KEYS["beta"])
    assert code == 0 and output.startswith("job"), output
    code, output = await jobs_list("not-a-key")
    assert code == 1 and output.strip() == "maasctl: error: UNAUTHENTICATED (ListJobs): unknown API key", output
