"""ExplanationService: explanations as jobs on the training queue, for the ones a deadline cannot hold.

Submitting checks the request the way Predict's are checked (size limits, the tenant's view of the
model) and then asks the family's service to validate it (Explain with validate_only), which also
resolves the version (and a graph-store graph's version): the job explains exactly that version, on
that graph, wherever and whenever it runs. The family's trainer runs it (shared.training_worker:
at-least-once, taken over after a crash) and stores the response with the job; GetExplanation hands
it back to the submitting tenant only,
for `result_ttl_s` after the job finished (MAAS_GATEWAY_EXPLANATION_RESULT_TTL_S); then the job
and its result expire in Redis and it is NOT_FOUND.
"""

from __future__ import annotations

import base64

import grpc

from gateway.auth import current_tenant
from gateway.proxy import QUERY_ROUTES, GatewayProxy
from gateway.training import TrainingServicer
from maas.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from maas.training.v1 import training_pb2
from shared.errors import InvalidArgumentError, NotFoundError
from shared.jobs import EXPLAIN, JobStore

EXPLAIN_ROUTES = {route.family: route for route in QUERY_ROUTES if route.method == "Explain"}


def to_explanation_job(record: dict) -> gateway_pb2.ExplanationJob:
    spec = record["spec"]
    return gateway_pb2.ExplanationJob(
        job_id=record["job_id"],
        state=training_pb2.JobState.Value(f"JOB_STATE_{record['state']}"),
        model_name=spec.get("model_name", ""),
        model_version=int(spec.get("model_version", 0)),
        method=spec.get("method", ""),
        error=record.get("error", ""),
        attempts=record["attempts"],
        created_at=record.get("created_at", ""),
        updated_at=record.get("updated_at", ""),
    )


class ExplanationServicer(gateway_pb2_grpc.ExplanationServiceServicer):
    def __init__(self, proxy: GatewayProxy, jobs: JobStore, training: TrainingServicer,
                 result_ttl_s: float = 24 * 3600.0) -> None:  # fmt: skip
        self.proxy = proxy
        self.jobs = jobs
        self.result_ttl_s = result_ttl_s
        self.training = training  # its WatchJob machinery (one shared Redis read, per-tenant stream limits)

    async def SubmitExplanation(self, request: gateway_pb2.SubmitExplanationRequest, context: grpc.aio.ServicerContext):
        family = request.WhichOneof("request")
        if family is None:
            raise InvalidArgumentError("request: set one of dense, gnn or nlp to the Explain request to run")
        message = getattr(request, family)
        route = EXPLAIN_ROUTES[family]
        self.proxy.limits.check(message)
        tenant = current_tenant()
        await self.proxy.catalog.check_visible(family, message.model_name, tenant)
        if getattr(message, "stored_graph", ""):
            await self.proxy.graphs.check_visible(message.stored_graph, tenant, message.model_name)
        message.validate_only = True
        checked = await self.proxy.backends[family].call(
            route.path, message.SerializeToString(), self.proxy.timeout(context)
        )
        message.validate_only = False
        answer = route.predict_response.FromString(checked)
        message.model_version = answer.model_version
        if "graph_version" in answer.DESCRIPTOR.fields_by_name and answer.graph_version:
            message.graph_version = answer.graph_version  # the stored graph's latest, pinned like the model's
        spec = {
            "kind": EXPLAIN, "family": family, "model_name": message.model_name,
            "model_version": message.model_version, "method": message.method, "tenant": tenant,
            "request": base64.b64encode(message.SerializeToString()).decode("ascii"),
        }  # fmt: skip
        job_id, created = await self.jobs.submit(family, spec, request.idempotency_key, tenant, self.result_ttl_s)
        record = await self.jobs.get(job_id)
        return gateway_pb2.SubmitExplanationResponse(job=to_explanation_job(record), created=created)

    async def _record(self, job_id: str) -> dict:
        try:
            record = await self.jobs.get(job_id, current_tenant())
        except NotFoundError:
            kept = f"for {self.result_ttl_s:g} s after they finish" if self.result_ttl_s > 0 else "forever"
            raise NotFoundError(f"explanation job {job_id!r} not found: it never existed (for this tenant), or it "
                                f"finished and expired; explanation results are kept {kept}") from None  # fmt: skip
        if record["spec"].get("kind") != EXPLAIN:
            raise NotFoundError(f"job {job_id!r} is a training job, not an explanation; call GetJob")
        return record

    async def GetExplanation(self, request: gateway_pb2.GetExplanationRequest, context: grpc.aio.ServicerContext):
        record = await self._record(request.job_id)
        response = gateway_pb2.GetExplanationResponse(job=to_explanation_job(record))
        if record["state"] == "SUCCEEDED":
            result = await self.jobs.result(request.job_id)
            if result is not None:
                family = record["spec"]["family"]
                getattr(response, family).CopyFrom(EXPLAIN_ROUTES[family].predict_response.FromString(result))
        return response

    async def WatchExplanation(self, request: gateway_pb2.WatchExplanationRequest, context: grpc.aio.ServicerContext):
        await self._record(request.job_id)
        async for event in self.training.job_events(request.job_id):
            yield gateway_pb2.WatchExplanationResponse(event=event)
