"""Fan-out: several Predict calls across families in parallel, chained where a step needs an
earlier step's output, all under the caller's one deadline."""

from __future__ import annotations

import asyncio
import re

import grpc

from gateway.auth import current_principal
from gateway.proxy import ROUTE_BY_FAMILY, GatewayProxy
from maas.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from shared.errors import FailedPreconditionError, InvalidArgumentError, MaasError, PermissionDeniedError

MAX_STEPS = 64
CURSOR = re.compile(r"\d{1,20}-\d{1,20}")  # a Redis Stream entry id
MAX_PAYLOAD_RECORDS = 1000


def check_plan(steps) -> None:
    if not steps:
        raise InvalidArgumentError("steps: at least one step is needed")
    if len(steps) > MAX_STEPS:
        raise InvalidArgumentError(f"steps: {len(steps)} steps; at most {MAX_STEPS} per call")
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if not step.name:
            raise InvalidArgumentError(f"steps[{i}].name: required")
        if step.name in seen:
            raise InvalidArgumentError(f"steps[{i}].name: {step.name!r} is used twice")
        if step.WhichOneof("call") is None:
            raise InvalidArgumentError(f"steps[{i}] ({step.name!r}): set dense, gnn or nlp")
        for j, source in enumerate(step.inputs_from):
            if source.step not in seen:
                raise InvalidArgumentError(
                    f"steps[{i}].inputs_from[{j}]: {source.step!r} is not an earlier step; a step can only use "
                    f"outputs of steps listed before it"
                )
            if step.WhichOneof("call") == "nlp":
                raise InvalidArgumentError(f"steps[{i}].inputs_from[{j}]: nlp steps take texts, not tensors")
            if step.WhichOneof("call") == "gnn" and source.input != "node_features":
                raise InvalidArgumentError(f"steps[{i}].inputs_from[{j}]: a gnn step can only take node_features")
        seen.add(step.name)


class FanoutServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, proxy: GatewayProxy) -> None:
        self.proxy = proxy

    async def ReadPayloads(self, request: gateway_pb2.ReadPayloadsRequest, context) -> gateway_pb2.ReadPayloadsResponse:
        if not request.model_name:
            raise InvalidArgumentError("model_name: required")
        limit = request.limit or 100
        if not 1 <= limit <= MAX_PAYLOAD_RECORDS:
            raise InvalidArgumentError(f"limit: {request.limit}; must be 1 to {MAX_PAYLOAD_RECORDS} (0 reads 100)")
        if request.after and not CURSOR.fullmatch(request.after):
            raise InvalidArgumentError(f"after: {request.after!r} is not a cursor; pass a ReadPayloadsResponse.next")
        principal = current_principal()
        tenant = request.tenant or principal.tenant
        if tenant != principal.tenant and not principal.admin:
            raise PermissionDeniedError(f"tenant: reading {tenant!r}'s payload records needs an API key with the "
                                        "admin role; without tenant, a caller reads its own")  # fmt: skip
        await self.proxy.catalog.find_visible(request.model_name, tenant)  # another tenant's private model: NOT_FOUND
        records, cursor = await self.proxy.payloads.read(tenant, request.model_name, request.after, limit)
        return gateway_pb2.ReadPayloadsResponse(
            records=[gateway_pb2.PayloadRecord(id=i, cloud_event=event) for i, event in records], next=cursor
        )

    async def Fanout(self, request: gateway_pb2.FanoutRequest, context: grpc.aio.ServicerContext):
        check_plan(request.steps)
        done: dict[str, asyncio.Future] = {}
        loop = asyncio.get_running_loop()
        for step in request.steps:
            done[step.name] = loop.create_future()

        async def run(step) -> gateway_pb2.FanoutResult:
            family = step.WhichOneof("call")
            route = ROUTE_BY_FAMILY[family]
            message = route.predict_request()
            message.CopyFrom(getattr(step, family))
            try:
                for source in step.inputs_from:
                    upstream = await asyncio.shield(done[source.step])
                    if upstream is None:
                        raise FailedPreconditionError(f"step {source.step!r}, which this step needs, failed")
                    outputs = upstream.outputs
                    if source.output not in outputs:
                        raise InvalidArgumentError(
                            f"inputs_from: step {source.step!r} has no output {source.output!r}; "
                            f"it has {sorted(outputs)}"
                        )
                    target = message.graph.node_features if family == "gnn" else message.inputs[source.input]
                    target.CopyFrom(outputs[source.output])
                raw = await self.proxy.predict_message(route, message, message.SerializeToString(), context,
                                                       trailing=False)  # fmt: skip
                response = route.predict_response.FromString(raw)
                done[step.name].set_result(response)
                return gateway_pb2.FanoutResult(name=step.name, code=0, **{family: response})
            except MaasError as exc:
                return gateway_pb2.FanoutResult(name=step.name, code=exc.code.value[0], message=exc.message)
            finally:
                if not done[step.name].done():  # failed, or cancelled: steps that need it stop waiting
                    done[step.name].set_result(None)

        # A TaskGroup: a step failing in a way no status covers cancels the others, and the call
        # ends INTERNAL, rather than leaving the steps that need it waiting forever.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run(step)) for step in request.steps]
        return gateway_pb2.FanoutResponse(results=[task.result() for task in tasks])
