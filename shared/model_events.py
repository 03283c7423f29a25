"""Notices that a model's versions or default changed, on one Redis channel every process hears.

Whoever changes something says so: a trainer when it publishes a version, a model service when
it loads, unloads or pins one. Model services re-read that model from the store at once, and
gateways re-read the family's models from its service; both still poll (every 30 s by default)
for a notice lost while Redis was away. So two views of a model disagree for the time a notice
takes (milliseconds), or at most one poll interval when Redis is down.

Pub/sub delivers at most once and keeps nothing: fine for notices whose only effect is "look
again now". Publishing fails open: the change is made and the poll catches up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

CHANNEL = "maas:v1:model-events"
GRAPH_CHANGED = "graph"


@dataclass(frozen=True)
class ModelEvent:
    family: str
    model: str
    # "published" (a new version in the store), "loaded", "unloaded" or "default" (a pin moved); or
    # GRAPH_CHANGED, where `model` is a stored graph of the family whose versions changed (a new one, or some
    # deleted by DeleteGraphVersion or retention): gateways read the graphs again, model services ignore it.
    kind: str
    version: int = 0


class ModelEvents:
    """Publishes and hears model events; with no Redis URL, does nothing (processes then poll)."""

    def __init__(self, url: str | None, timeout_s: float = 1.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        # After a Redis restart each pooled connection is stale once: a notice is sent again on a new one, so
        # it is not left to the next poll (as JobStore does).
        self._redis = (
            redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                 retry=Retry(NoBackoff(), 2), retry_on_error=[redis.ConnectionError])  # fmt: skip
            if url
            else None
        )

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    async def publish(self, event: ModelEvent) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.publish(CHANNEL, json.dumps(asdict(event)))
        except (redis.RedisError, OSError) as exc:
            log.warning("could not publish %s (other processes will see it at their next poll): %s", event, exc)

    async def listen(self, handle: Callable[[ModelEvent], Awaitable[None]], retry_s: float = 1.0) -> None:
        """Calls `handle` for each event until cancelled; resubscribes after a Redis failure."""
        if self._redis is None:
            return
        # Its own connection, without a read timeout: a quiet channel is not a failure.
        listener = redis.Redis.from_url(self.url, socket_connect_timeout=self.timeout_s, health_check_interval=30)
        while True:
            try:
                async with listener.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        event = _parse(message["data"])
                        if event is not None:
                            await handle(event)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                log.warning("model events: lost Redis (%s); polling until it is back", exc)
                await asyncio.sleep(retry_s)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _parse(data: bytes | str) -> ModelEvent | None:
    try:
        fields = json.loads(data)
        return ModelEvent(
            str(fields["family"]), str(fields["model"]), str(fields["kind"]), int(fields.get("version", 0))
        )
    except (ValueError, KeyError, TypeError):
        log.warning("ignored a malformed model event: %r", data[:200])
        return None
