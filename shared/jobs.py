"""Training jobs in Redis: records, event history, and one Stream per family as the queue.

Keys (in the queue's Redis, which runs with AOF and noeviction):
  maas:job:<id>             hash: the job record
  maas:job:<id>:events      stream: every state change and epoch, for WatchJob's history
  maas:jobs:<family>        stream: the queue, read by the "trainers" consumer group
  maas:jobs:<family>:dead   stream: jobs given up after too many failed attempts
  maas:jobs:index           sorted set of job ids by submission time
  maas:jobs:idempotency:<k> the job id a key was first used for

Submitting is one Lua script, so a job is either recorded, queued and indexed, or not at all.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as redis

from shared.errors import FailedPreconditionError, NotFoundError, UnavailableError

GROUP = "trainers"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
INDEX = "maas:jobs:index"

_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {existing, 0} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(cjson.decode(ARGV[3])))
redis.call('XADD', KEYS[3], '*', unpack(cjson.decode(ARGV[4])))
redis.call('XADD', KEYS[4], '*', 'job_id', ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return {ARGV[1], 1}
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def job_key(job_id: str) -> str:
    return f"maas:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"maas:job:{job_id}:events"


def queue_key(family: str) -> str:
    return f"maas:jobs:{family}"


def dead_letter_key(family: str) -> str:
    return f"maas:jobs:{family}:dead"


def _flatten(fields: dict[str, Any]) -> list[str]:
    flat = []
    for key, value in fields.items():
        flat += [key, value if isinstance(value, str) else json.dumps(value)]
    return flat


def decode_record(raw: dict[bytes, bytes]) -> dict[str, Any]:
    record = {key.decode(): value.decode() for key, value in raw.items()}
    for key in ("spec", "metrics"):
        record[key] = json.loads(record.get(key) or "{}")
    for key in ("epoch", "epochs", "model_version", "attempts"):
        record[key] = int(record.get(key) or 0)
    record["train_loss"] = float(record.get("train_loss") or 0.0)
    record["promoted"] = record.get("promoted") == "1"
    record["cancel_requested"] = record.get("cancel_requested") == "1"
    return record


def decode_event(fields: dict[bytes, bytes]) -> dict[str, Any]:
    event = {key.decode(): value.decode() for key, value in fields.items()}
    event["validation_metrics"] = json.loads(event.get("validation_metrics") or "{}")
    for key in ("epoch", "epochs"):
        event[key] = int(event.get(key) or 0)
    for key in ("train_loss", "eta_seconds"):
        event[key] = float(event.get(key) or 0.0)
    return event


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._submit = client.register_script(_SUBMIT)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=30, health_check_interval=10))

    async def close(self) -> None:
        await self.redis.aclose()

    async def submit(
        self, family: str, spec: dict[str, Any], idempotency_key: str = "", tenant: str = ""
    ) -> tuple[str, bool]:
        """Records and queues a job; returns (job_id, created). A key the tenant used before returns that job."""
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        key = f"maas:jobs:idempotency:{tenant}:{idempotency_key or job_id}"
        stamp = now_iso()
        record = {
            "job_id": job_id, "family": family, "spec": spec, "state": "QUEUED", "epochs": spec.get("epochs", 0),
            "attempts": 0, "created_at": stamp, "updated_at": stamp, "tenant": tenant,
        }  # fmt: skip
        event = {"job_id": job_id, "state": "QUEUED", "message": "accepted and queued", "time": stamp}
        try:
            found, created = await self._submit(
                keys=[key, job_key(job_id), events_key(job_id), queue_key(family), INDEX],
                args=[job_id, time.time(), json.dumps(_flatten(record)), json.dumps(_flatten(event))],
            )
        except (redis.RedisError, OSError) as exc:
            raise UnavailableError(f"the job queue is unavailable, nothing was queued: {exc}") from None
        return found.decode() if isinstance(found, bytes) else found, bool(created)

    async def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job's record; with a tenant, another tenant's job is NOT_FOUND, as if it did not exist."""
        raw = await self.redis.hgetall(job_key(job_id))
        if not raw or (tenant is not None and raw.get(b"tenant", b"").decode() != tenant):
            raise NotFoundError(f"job {job_id!r} not found")
        return decode_record(raw)

    async def list(self, family: str = "", limit: int = 100, tenant: str | None = None) -> list[dict[str, Any]]:
        ids = await self.redis.zrevrange(INDEX, 0, -1 if family or tenant is not None else limit - 1)
        records = []
        for job_id in ids:
            raw = await self.redis.hgetall(job_key(job_id.decode()))
            if not raw or (tenant is not None and raw.get(b"tenant", b"").decode() != tenant):
                continue
            if not family or raw.get(b"family", b"").decode() == family:
                records.append(decode_record(raw))
                if len(records) >= limit:
                    break
        return records

    async def update(self, job_id: str, event_message: str = "", event: dict[str, Any] | None = None, **fields) -> None:
        """Updates the record and appends an event, in one transaction."""
        fields["updated_at"] = now_iso()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                job_key(job_id), mapping={k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
            )
            if event is not None or event_message or "state" in fields:
                record = {"job_id": job_id, "state": fields.get("state", ""), "message": event_message,
                          "time": fields["updated_at"], **(event or {})}  # fmt: skip
                if not record["state"]:
                    record["state"] = (await self.redis.hget(job_key(job_id), "state") or b"").decode()
                pipe.xadd(
                    events_key(job_id), {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
                )
            await pipe.execute()

    async def request_cancel(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        record = await self.get(job_id, tenant)
        if record["state"] in TERMINAL:
            raise FailedPreconditionError(f"job {job_id} already finished: {record['state']}")
        if record["state"] == "QUEUED":
            # Nobody runs it yet: cancel now; the trainer that later reads the entry just acknowledges it.
            await self.update(job_id, "cancelled while queued", state="CANCELLED", cancel_requested="1")
        else:
            await self.update(job_id, "cancellation requested; stops at the end of the epoch", cancel_requested="1")
        return await self.get(job_id)

    async def history(self, job_id: str, after: str = "0-0", block_ms: int | None = None) -> list[tuple[str, dict]]:
        """Events after the given stream id; waits up to block_ms for new ones when given."""
        if block_ms is None:
            entries = await self.redis.xrange(events_key(job_id), min=f"({after}" if after != "0-0" else "-")
        else:
            reply = await self.redis.xread({events_key(job_id): after}, block=block_ms)
            entries = reply[0][1] if reply else []
        return [(entry_id.decode(), decode_event(fields)) for entry_id, fields in entries]
