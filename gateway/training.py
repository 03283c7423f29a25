"""gRPC face of the training API on the gateway: translates messages; jobs live in Redis, data sets on disk."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.json_format import MessageToDict, ParseDict

from gateway.auth import current_tenant
from gateway.catalog import ModelCatalog
from gateway.job_spec import normalize
from gateway.settings import GatewaySettings
from maas.training.v1 import training_pb2, training_pb2_grpc
from shared.datasets import DatasetStore
from shared.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError
from shared.families import BY_NAME, BY_TRAINING_CODE
from shared.families import FAMILIES as FAMILY_ENTRIES
from shared.jobs import EXPLAIN, TERMINAL, JobEventFeed, JobStore

# Uploads are written (hashed, sealed) on two threads of their own: glibc gives each thread that allocates
# its own arena and keeps what it freed, so the default executor's many threads would each keep megabytes.
UPLOADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="uploads")
FAMILIES = {code: family.name for code, family in BY_TRAINING_CODE.items()}
FAMILY_CODES = {name: code for code, name in FAMILIES.items()}


def family_name(code: int, field: str) -> str:
    if code not in FAMILIES:
        choices = ", ".join(training_pb2.Family.Name(c) for c in sorted(FAMILIES))
        raise InvalidArgumentError(f"{field}: must be one of {choices}")
    return FAMILIES[code]


def to_dataset(meta: dict) -> training_pb2.Dataset:
    return training_pb2.Dataset(
        dataset_id=meta["dataset_id"],
        name=meta["name"],
        family=FAMILY_CODES[meta["family"]],
        format=training_pb2.DatasetFormat.Value(f"DATASET_FORMAT_{meta['format'].upper()}"),
        sha256=meta["sha256"],
        size_bytes=meta["size_bytes"],
        num_examples=meta["num_examples"],
        feature_shape=meta["feature_shape"],
        task=meta["task"],
        class_names=meta["class_names"],
        created_at=meta["created_at"],
    )


def to_spec(spec: dict) -> training_pb2.SubmitJobRequest:
    wire = {key: value for key, value in spec.items() if key not in ("task", "tenant")}
    wire["family"] = FAMILY_CODES[spec["family"]]
    wire["optimizer"] = f"OPTIMIZER_{spec['optimizer'].upper()}"
    return ParseDict(wire, training_pb2.SubmitJobRequest(), ignore_unknown_fields=True)


def to_job(record: dict) -> training_pb2.Job:
    return training_pb2.Job(
        job_id=record["job_id"],
        state=training_pb2.JobState.Value(f"JOB_STATE_{record['state']}"),
        spec=to_spec(record["spec"]),
        epoch=record["epoch"],
        train_loss=record["train_loss"],
        metrics=record["metrics"],
        model_version=record["model_version"],
        promoted=record["promoted"],
        gate_result=record.get("gate_result", ""),
        error=record.get("error", ""),
        attempts=record["attempts"],
        created_at=record.get("created_at", ""),
        updated_at=record.get("updated_at", ""),
    )


def to_event(event: dict) -> training_pb2.JobEvent:
    return training_pb2.JobEvent(
        job_id=event["job_id"],
        state=training_pb2.JobState.Value(f"JOB_STATE_{event['state']}") if event.get("state") else 0,
        epoch=event["epoch"],
        epochs=event["epochs"],
        train_loss=event["train_loss"],
        validation_metrics=event["validation_metrics"],
        eta_seconds=event["eta_seconds"],
        message=event.get("message", ""),
        time=event.get("time", ""),
    )


def is_explanation(record: dict) -> bool:
    return record["spec"].get("kind") == EXPLAIN


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(
        self,
        jobs: JobStore,
        datasets: DatasetStore,
        max_dataset_bytes: int,
        catalog: ModelCatalog | None = None,
        max_watches_per_tenant: int | None = None,
    ) -> None:
        self.jobs = jobs
        self.datasets = datasets
        self.max_dataset_bytes = max_dataset_bytes
        self.catalog = catalog
        # Unset: MAAS_GATEWAY_MAX_WATCH_STREAMS_PER_TENANT, or its default.
        if max_watches_per_tenant is None:
            max_watches_per_tenant = GatewaySettings().max_watch_streams_per_tenant
        self.max_watches_per_tenant = max_watches_per_tenant
        # Every WatchJob of this worker shares one blocking Redis read.
        self.feed = JobEventFeed(jobs.redis)
        self.watching: Counter[str] = Counter()

    async def UploadDataset(self, request_iterator, context: grpc.aio.ServicerContext):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "info":
            raise InvalidArgumentError("the first message must carry info (name, family, format); chunks follow")
        family = family_name(first.info.family, "info.family")
        if first.info.format not in training_pb2.DatasetFormat.values() or not first.info.format:
            raise InvalidArgumentError(f"info.format: {first.info.format} is not a format; use NPZ, CSV, JSON or JSONL")
        fmt = training_pb2.DatasetFormat.Name(first.info.format).removeprefix("DATASET_FORMAT_").lower()
        if fmt not in BY_NAME[family].dataset_formats:
            allowed = ", ".join(sorted(BY_NAME[family].dataset_formats))
            raise InvalidArgumentError(f"info.format: {fmt!r} is not a {family} format; use one of: {allowed}")
        # Streamed to the store as it arrives: size and sha256 checked on the way, never parsed here.
        loop = asyncio.get_running_loop()
        writer = await loop.run_in_executor(UPLOADS, self.datasets.writer, self.max_dataset_bytes)
        try:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgumentError("only the first message may carry info; send chunks after it")
                await loop.run_in_executor(UPLOADS, writer.write, message.chunk)
            meta = await loop.run_in_executor(UPLOADS, writer.commit, first.info.name, family, fmt, current_tenant())
        except BaseException:
            await loop.run_in_executor(UPLOADS, writer.discard)
            raise
        return training_pb2.UploadDatasetResponse(dataset=to_dataset(meta))

    async def GetDataset(self, request, context):
        meta = await asyncio.to_thread(self.datasets.meta, request.dataset_id, current_tenant())
        return training_pb2.GetDatasetResponse(dataset=to_dataset(meta))

    async def ListDatasets(self, request, context):
        family = FAMILIES.get(request.family, "")
        uploaded = await asyncio.to_thread(self.datasets.list, current_tenant(), family)
        builtin = [
            training_pb2.BuiltinDataset(name=name, family=entry.training_code)
            for entry in FAMILY_ENTRIES
            if not family or entry.name == family
            for name in entry.builtin_datasets
        ]
        return training_pb2.ListDatasetsResponse(datasets=[to_dataset(m) for m in uploaded], builtin_datasets=builtin)

    async def SubmitJob(self, request: training_pb2.SubmitJobRequest, context):
        family = family_name(request.family, "family")
        dataset = None
        if request.WhichOneof("data") == "dataset_id":
            # The framing of its format is checked now; the trainer parses the whole file.
            dataset = await asyncio.to_thread(self.datasets.check, request.dataset_id, current_tenant())
        limits = await self.jobs.limits(family)  # the ones the family's trainers enforce
        spec = normalize(MessageToDict(request, preserving_proto_field_name=True), family, dataset, limits)
        if self.catalog is not None:
            await self.catalog.check_writable(spec["output_model"], family, current_tenant(), request.private)
        spec["tenant"] = current_tenant()
        job_id, created = await self.jobs.submit(family, spec, request.idempotency_key, current_tenant())
        return training_pb2.SubmitJobResponse(job=to_job(await self.jobs.get(job_id)), created=created)

    async def GetJob(self, request, context):
        record = await self.jobs.get(request.job_id, current_tenant())
        if is_explanation(record):
            raise NotFoundError(f"job {request.job_id!r} is an explanation, not a training job; call GetExplanation")
        return training_pb2.GetJobResponse(job=to_job(record))

    async def ListJobs(self, request, context):
        family = FAMILIES.get(request.family, "")
        records = await self.jobs.list(family, request.limit or 100, current_tenant())
        return training_pb2.ListJobsResponse(jobs=[to_job(record) for record in records if not is_explanation(record)])

    async def CancelJob(self, request, context):
        record = await self.jobs.request_cancel(request.job_id, current_tenant())
        return training_pb2.CancelJobResponse(job=to_job(record))

    async def WatchJob(self, request, context):
        async for event in self.job_events(request.job_id):
            yield training_pb2.WatchJobResponse(event=event)

    async def job_events(self, job_id: str):
        """A job's events, its history first, until the terminal state; the caller's tenant's jobs only."""
        tenant = current_tenant()
        if self.watching[tenant] >= self.max_watches_per_tenant:
            raise ResourceExhaustedError(
                f"WatchJob: {self.watching[tenant]} streams of this tenant are open on this gateway worker, the "
                f"most allowed (max_watch_streams_per_tenant={self.max_watches_per_tenant}); close one, or poll GetJob"
            )
        self.watching[tenant] += 1
        try:
            await self.jobs.get(job_id, tenant)  # NOT_FOUND for an unknown job
            last = "0-0"
            for entry_id, event in await self.jobs.history(job_id):  # the history first, for late watchers
                last = entry_id
                yield to_event(event)
                if event.get("state") in TERMINAL:
                    return
            async with self.feed.follow(job_id, last) as updates:
                while True:
                    events = await updates.get()
                    if isinstance(events, Exception):
                        raise UnavailableError(f"the job queue is unavailable; watch again: {events}")
                    for _, event in events:
                        yield to_event(event)
                        if event.get("state") in TERMINAL:
                            return
        finally:
            self.watching[tenant] -= 1
            if not self.watching[tenant]:
                del self.watching[tenant]
