"""The result cache: a bounded LRU in each gateway worker, in front of Redis.

A hit in the worker's own memory never leaves the process; Redis is the second level that
every worker and replica shares. Neither level needs invalidation: every key names the model
version that computed the value, so a new version or default means new keys. Entries expire
after the same TTL in both levels (a value Redis hands back lives that long again locally,
so at most two TTLs in all).

The cache fails open: when Redis is down, calls go on uncached (local hits still count).
After a Redis failure Redis stays bypassed for `retry_after_s`, so a dead Redis costs one
timeout per interval, not one per call.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections import OrderedDict

import redis.asyncio as redis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

CACHE_RESULTS = Counter("maas_gateway_cache_total", "Result cache look-ups by outcome", ["family", "outcome"])
LOCAL_HITS = Counter(
    "maas_gateway_cache_local_hits_total", "Cache hits served from the worker's own memory, with no Redis call",
    ["family"],
)  # fmt: skip


@functools.cache
def _local_hit_counters(family: str) -> tuple:
    """The two counters a local hit adds to, looked up once per family (`labels()` locks and hashes)."""
    return CACHE_RESULTS.labels(family, "hit"), LOCAL_HITS.labels(family)


class LocalCache:
    """Response bytes by key, least recently used first out, at most `max_bytes` of values in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if expires_at <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes // 8:  # one huge response must not flush everything else
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + ttl_s, value)
        self.size += len(value)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.size -= len(value)

    def __len__(self) -> int:
        return len(self._entries)


class ResultCache:
    def __init__(
        self,
        url: str | None,
        ttl_s: float,
        jitter: float = 0.1,
        timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
        local_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.ttl_s = ttl_s
        self.local = LocalCache(local_max_bytes) if url and local_max_bytes > 0 else None
        self.jitter = jitter
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._redis = (
            # A pooled connection that went stale when Redis restarted is retried once, at once, on a new
            # one; a Redis that is down still fails that one call and is then bypassed for retry_after_s.
            redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
                retry=Retry(NoBackoff(), 1), retry_on_error=[redis.ConnectionError],
            )  # fmt: skip
            if url
            else None
        )

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    def available(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._down_until

    def get_local(self, family: str, key: str) -> bytes | None:
        """The response bytes from this worker's memory, or None; never waits for anything."""
        value = self.local.get(key) if self.local is not None else None
        if value is not None:
            hits, local_hits = _local_hit_counters(family)
            hits.inc()
            local_hits.inc()
        return value

    async def get(self, family: str, key: str, ttl_s: float | None = None) -> bytes | None:
        """The response bytes from Redis, or None on a miss or a Redis failure (then counted as error)."""
        try:
            value = await self._redis.get(key)
        except (redis.RedisError, OSError) as exc:
            self._failed("read", exc)
            CACHE_RESULTS.labels(family, "error").inc()
            return None
        CACHE_RESULTS.labels(family, "hit" if value is not None else "miss").inc()
        if value is not None and self.local is not None:
            self.local.put(key, value, ttl_s or self.ttl_s)
        return value

    async def put(self, family: str, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        ttl_ms = int((ttl_s or self.ttl_s) * 1000 * (1 + random.uniform(0, self.jitter)))
        if self.local is not None:
            self.local.put(key, value, ttl_ms / 1000)
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
