"""Per-tenant rate limits: a token bucket kept in Redis, so it holds across gateway replicas.

Redis's own clock refills the bucket, so replicas with skewed clocks agree. When Redis is
unreachable the limit fails open, like the cache: serving goes on, and the failure is logged.
"""

from __future__ import annotations

import logging
import time

import grpc
import redis.asyncio as redis

from gateway.auth import OPEN_METHODS, current_tenant
from shared.handler_wrapping import MethodInterceptor, wrap_handler
from shared.observability import add_trailing_metadata

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
_TAKE = """
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait_ms
"""


class RateLimiter:
    def __init__(self, client: redis.Redis, rate_per_s: float, burst: int, per_tenant: dict[str, dict]) -> None:
        self.redis = client
        self.default = (rate_per_s, burst or max(1, int(rate_per_s)))
        self.per_tenant = per_tenant
        self._take = client.register_script(_TAKE)
        self._down_until = 0.0

    def limits(self, tenant: str) -> tuple[float, int]:
        override = self.per_tenant.get(tenant)
        if override is None:
            return self.default
        rate = float(override.get("rate_per_s", self.default[0]))
        return rate, int(override.get("burst") or max(1, rate))

    async def wait_ms(self, tenant: str) -> tuple[int, float]:
        """0 when the call may go ahead, else how long to wait; and the tenant's rate."""
        rate, burst = self.limits(tenant)
        if rate <= 0 or time.monotonic() < self._down_until:
            return 0, rate
        try:
            return int(await self._take(keys=[f"maas:ratelimit:{tenant}"], args=[rate, burst])), rate
        except (redis.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + 1.0
            log.warning("rate limiter unavailable, not limiting for 1 s: %s", exc)
            return 0, rate


def refusal(tenant: str, rate: float, wait_ms: int) -> str:
    """What a caller over its tenant's rate is told."""
    return f"rate limit of {rate:g} requests/s for tenant {tenant or 'default'!r} reached; retry after {wait_ms} ms"


class RateLimitInterceptor(MethodInterceptor):
    """RESOURCE_EXHAUSTED, with a `retry-after-ms` hint, once a tenant's bucket is empty."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def admit(self, context) -> None:
        tenant = current_tenant()
        wait_ms, rate = await self.limiter.wait_ms(tenant)
        if wait_ms:
            add_trailing_metadata(context, RETRY_AFTER_KEY, str(wait_ms))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal(tenant, rate, wait_ms))

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith(OPEN_METHODS):
            return handler
        admit = self.admit

        def unary(behavior):
            async def wrapped(request, context):
                await admit(context)
                return await behavior(request, context)

            return wrapped

        def streaming(behavior):
            async def wrapped(request, context):
                await admit(context)
                async for item in behavior(request, context):
                    yield item

            return wrapped

        return wrap_handler(handler, unary, streaming)
