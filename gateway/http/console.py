"""The web console: a static page and the small JSON API it reads.

The page (`/console`, `/console/jobs/{job_id}`) is plain HTML with a vendored uPlot, no build step;
it needs no key. Its API (`/console/api/...`) goes through the same checks as gRPC: models the
caller's tenant may see, promote and rollback through ModelService.SetDefaultVersion (admin, or
the owner of a private model), the tenant's own training jobs, and a job's events as server-sent
events from WatchJob's logic (the history, then each new event). The browser sends the API key as
an `Authorization` header from fetch, and reads the event stream with fetch too (EventSource cannot
set headers), so the key never appears in a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from gateway.auth import current_principal, current_tenant
from gateway.http.context import HttpCallContext
from gateway.http.kserve import ERRORS
from gateway.http.metrics import snapshot
from gateway.http.schemas import ConsoleModel, ConsoleModels, Job, Jobs, Promote, Stats, WhoAmI
from gateway.model_service import _may_change
from maas.common.v1 import model_pb2
from maas.models.v1 import models_pb2
from maas.training.v1 import training_pb2
from shared.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from shared.families import BY_NAME

STATIC = Path(__file__).resolve().parent / "static"
PAGE = STATIC / "console.html"
KEEPALIVE_S = 15.0
# The page loads only its own files, and may not be framed (its buttons change models).
PAGE_HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
}

router = APIRouter(tags=["Console"], responses=ERRORS)


@router.get("/console", include_in_schema=False)
@router.get("/console/", include_in_schema=False)
@router.get("/console/jobs/{job_id}", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html", headers=PAGE_HEADERS)


@router.get("/console/api/whoami", response_model=WhoAmI, summary="The caller's tenant and roles")
async def whoami(request: Request) -> dict:
    principal = current_principal()
    return {"tenant": principal.tenant, "admin": principal.admin,
            "keys_required": request.app.state.front.keys is not None}  # fmt: skip


def state_name(state: int) -> str:
    return model_pb2.ModelState.Name(state).removeprefix("MODEL_STATE_")


def console_model(model: model_pb2.Model) -> dict[str, Any]:
    versions = sorted(model.versions, key=lambda v: v.version)
    return {
        "name": model.name,
        "family": next((v.family for v in versions if v.family), ""),
        "owner": next((v.owner for v in versions if v.owner), ""),
        "default_version": model.default_version,
        "versions": [
            {
                "version": v.version,
                "state": state_name(v.state),
                "state_reason": v.state_reason,
                "device": v.device,
                "framework": v.framework,
                "metrics": dict(v.metrics),
                "created_at": v.created_at,
                "source": v.source,
                "size_bytes": v.size_bytes,
            }
            for v in versions
        ],
    }


@router.get("/console/api/models", response_model=ConsoleModels, summary="Loaded models the caller may see")
async def models(request: Request) -> dict:
    front = request.app.state.front
    reply = await front.models.ListModels(models_pb2.ListModelsRequest(), HttpCallContext.from_request(request))
    return {"models": [console_model(m) for m in reply.models]}


@router.post("/console/api/models/{model_name}/promote", response_model=ConsoleModel,
             summary="Make a version the default (admin, or the owner of a private model)")  # fmt: skip
async def promote(model_name: str, body: Promote, request: Request) -> dict:
    front = request.app.state.front
    reply = await front.models.SetDefaultVersion(
        models_pb2.SetDefaultVersionRequest(model_name=model_name, model_version=body.version),
        HttpCallContext.from_request(request),
    )
    return console_model(reply.model)


@router.post("/console/api/models/{model_name}/rollback", response_model=ConsoleModel,
             summary="Make the newest version older than the default the default again")  # fmt: skip
async def rollback(model_name: str, request: Request) -> dict:
    front = request.app.state.front
    context = HttpCallContext.from_request(request)
    family = await front.models.loaded_family(model_name)
    # Who may change it is checked first, so a caller without the right learns nothing from the versions.
    _may_change(model_name, front.catalog.owner_of(family, model_name), "SetDefaultVersion")
    listing = await front.models.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=model_name), context)
    older = [v.version for v in listing.versions
             if v.version < listing.default_version and v.state != model_pb2.MODEL_STATE_FAILED]  # fmt: skip
    if not older:
        raise FailedPreconditionError(
            f"{model_name} has no version older than its default v{listing.default_version} to roll back to"
        )
    reply = await front.models.SetDefaultVersion(
        models_pb2.SetDefaultVersionRequest(model_name=model_name, model_version=max(older)), context
    )
    return console_model(reply.model)


def job_summary(record: dict[str, Any]) -> dict[str, Any]:
    spec = record.get("spec") or {}
    metrics = {k: float(v) for k, v in (record.get("metrics") or {}).items() if isinstance(v, int | float)}
    return {
        "job_id": record.get("job_id", ""),
        "state": record.get("state", ""),
        "family": spec.get("family", record.get("family", "")),
        "architecture": spec.get("architecture", ""),
        "output_model": spec.get("output_model", ""),
        "epoch": int(record.get("epoch") or 0),
        "epochs": int(spec.get("epochs") or record.get("epochs") or 0),
        "train_loss": float(record.get("train_loss") or 0.0),
        "metrics": metrics,
        "model_version": int(record.get("model_version") or 0),
        "promoted": bool(record.get("promoted")),
        "error": record.get("error", ""),
        "created_at": record.get("created_at", ""),
        "updated_at": record.get("updated_at", ""),
    }


def _jobs(request: Request):
    front = request.app.state.front
    if front.jobs is None or front.training is None:
        raise UnavailableError("the training API is off on this gateway (no MAAS_GATEWAY_QUEUE_REDIS_URL)")
    return front


@router.get("/console/api/jobs", response_model=Jobs, summary="The caller's training jobs, newest first")
async def jobs(request: Request, family: str = "", limit: int = Query(50, ge=1, le=500)) -> dict:
    front = _jobs(request)
    if family and family not in BY_NAME:
        raise InvalidArgumentError(f"family: {family!r} is not one of {sorted(BY_NAME)}")
    records = await front.jobs.list(family, limit, current_tenant())
    return {"jobs": [job_summary(r) for r in records]}


@router.get("/console/api/jobs/{job_id}", response_model=Job, summary="One training job")
async def job(job_id: str, request: Request) -> dict:
    front = _jobs(request)
    return job_summary(await front.jobs.get(job_id, current_tenant()))


def event_json(event: training_pb2.JobEvent) -> dict[str, Any]:
    return {
        "job_id": event.job_id,
        "state": training_pb2.JobState.Name(event.state).removeprefix("JOB_STATE_") if event.state else "",
        "epoch": event.epoch,
        "epochs": event.epochs,
        "train_loss": event.train_loss,
        "validation_metrics": dict(event.validation_metrics),
        "eta_seconds": event.eta_seconds,
        "message": event.message,
        "time": event.time,
    }


EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events: each `data:` line is one JobEvent as JSON (state, epoch, epochs, "
        "train_loss, validation_metrics, eta_seconds, message, time); the stream ends after a final state",
        "content": {"text/event-stream": {"schema": {
            "type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}},
    }
}


@router.get("/console/api/jobs/{job_id}/events", summary="A job's events as server-sent events",
            responses=EVENTS_RESPONSES, response_class=StreamingResponse)  # fmt: skip
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    front = _jobs(request)
    events = front.training.WatchJob(training_pb2.WatchJobRequest(job_id=job_id), HttpCallContext.from_request(request))
    try:
        first = await anext(events)  # NOT_FOUND, or too many streams, as an HTTP error before the stream starts
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(_stream(events, first, front.closing), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})  # fmt: skip


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(events, first, closing: asyncio.Event):
    """The events as SSE, a comment every 15 s to keep proxies from closing the stream, until the
    job ends, the caller goes away or the gateway shuts down (the caller then watches again)."""
    closed = asyncio.ensure_future(closing.wait())
    pending: asyncio.Future | None = None
    try:
        if first is None:
            return
        yield _sse(event_json(first.event))
        while True:
            pending = pending or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending, closed}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
            if pending in done:
                try:
                    reply = pending.result()
                except StopAsyncIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - the stream has started: say why it ends, then end it
                    yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n".encode()
                    return
                pending = None
                yield _sse(event_json(reply.event))
            elif closed in done:
                yield b"event: error\ndata: {\"error\": \"the gateway is shutting down; watch again\"}\n\n"
                return
            else:
                yield b": keep-alive\n\n"
    finally:
        closed.cancel()
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


@router.get("/console/api/stats", response_model=Stats,
            summary="The gateway's request and cache counters, summed over its workers")  # fmt: skip
async def stats() -> dict:
    # Counted by rpc and route, never by model: no tenant learns another's private model names from them.
    return await asyncio.to_thread(snapshot)
