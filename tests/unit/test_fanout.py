"""Fan-out's orchestration: a step that fails in a way no status covers cannot leave the steps that
need it waiting forever."""

import asyncio

import pytest

from gateway.fanout import FanoutServicer
from maas.dense.v1 import dense_pb2
from maas.gateway.v1 import gateway_pb2


class BrokenProxy:
    """Step "a" fails with a plain exception (a bug, not a status); every other step answers."""

    async def predict_message(self, route, message, raw, context, trailing=True):
        if message.model_name == "a":
            raise RuntimeError("a bug in step a")
        return dense_pb2.PredictResponse(model_name=message.model_name).SerializeToString()


async def test_a_failure_that_is_not_a_status_ends_the_call_instead_of_hanging_it():
    request = gateway_pb2.FanoutRequest(
        steps=[
            gateway_pb2.FanoutStep(name="a", dense=dense_pb2.PredictRequest(model_name="a")),
            gateway_pb2.FanoutStep(
                name="b",
                dense=dense_pb2.PredictRequest(model_name="b"),
                inputs_from=[gateway_pb2.StepInput(input="x", step="a", output="y")],
            ),
        ]
    )
    with pytest.raises(ExceptionGroup) as err:  # the error interceptor answers INTERNAL for it
        await asyncio.wait_for(FanoutServicer(BrokenProxy()).Fanout(request, context=None), timeout=10)
    assert err.group_contains(RuntimeError, match="a bug in step a")
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("FanoutServicer.Fanout")]
    assert not [t for t in left if not t.done()], "a step was left waiting"


async def test_independent_steps_still_answer():
    request = gateway_pb2.FanoutRequest(
        steps=[gateway_pb2.FanoutStep(name=n, dense=dense_pb2.PredictRequest(model_name=n)) for n in ("b", "c")]
    )
    reply = await asyncio.wait_for(FanoutServicer(BrokenProxy()).Fanout(request, context=None), timeout=10)
    assert [r.name for r in reply.results] == ["b", "c"] and all(r.code == 0 for r in reply.results)
