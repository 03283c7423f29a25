"""The result cache in Redis. It fails open: when Redis is down, calls go on uncached.

After a Redis failure the cache stays bypassed for `retry_after_s`, so a dead Redis costs
one timeout per interval, not one per call.
"""

from __future__ import annotations

import logging
import random
import time

import redis.asyncio as redis
from prometheus_client import Counter

log = logging.getLogger(__name__)

CACHE_RESULTS = Counter("maas_gateway_cache_total", "Result cache look-ups by outcome", ["family", "outcome"])


class ResultCache:
    def __init__(
        self,
        url: str | None,
        ttl_s: float,
        jitter: float = 0.1,
        timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
    ) -> None:
        self.ttl_s = ttl_s
        self.jitter = jitter
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._redis = (
            redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
            )
            if url
            else None
        )

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    def available(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._down_until

    async def get(self, family: str, key: str) -> bytes | None:
        """The cached response bytes, or None on a miss or a Redis failure (then counted as error)."""
        try:
            value = await self._redis.get(key)
        except (redis.RedisError, OSError) as exc:
            self._failed("read", exc)
            CACHE_RESULTS.labels(family, "error").inc()
            return None
        CACHE_RESULTS.labels(family, "hit" if value is not None else "miss").inc()
        return value

    async def put(self, family: str, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        ttl_ms = int((ttl_s or self.ttl_s) * 1000 * (1 + random.uniform(0, self.jitter)))
        try:
            await self._redis.set(key, value, px=ttl_ms)
            return True
        except (redis.RedisError, OSError) as exc:
            self._failed("write", exc)
            CACHE_RESULTS.labels(family, "error").inc()
            return False

    def _failed(self, what: str, exc: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_after_s
        log.warning("result cache %s failed, serving uncached for %.1fs: %s", what, self.retry_after_s, exc)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
