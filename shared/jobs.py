"""Training jobs in Redis: records, event history, and per-tenant Streams as the queue.

Keys (in the queue's Redis, which runs with AOF and noeviction):
  maas:job:<id>                       hash: the job record (its `attempts` are counted here)
  maas:job:<id>:events                stream: every state change and epoch, for WatchJob's history
  maas:job:<id>:result                string: the result of a job that makes bytes, not a version (explanations)
  maas:jobs:<family>:t:<tenant>       stream: one tenant's queue of a family, read by the "trainers" group
  maas:jobs:<family>:tenants          set: the tenants whose queue of that family holds entries
  maas:jobs:<family>                  stream: the single queue of earlier versions; drained, never written
  maas:jobs:<family>:dead             stream: jobs given up after too many failed attempts
  maas:jobs:<family>:limits           hash: the size limits the family's trainers enforce (JobLimits)
  maas:jobs:index                     sorted set of job ids by submission time
  maas:jobs:idempotency:<n>:<tenant>:<key>
                                      the job id a key was first used for; n is the tenant's length, so
                                      no tenant name (':' included) can stand for another's

A job submitted with a result TTL (explanations: the gateway's `explanation_result_ttl_s`) keeps its
record, events, result and idempotency key for that long after it finishes, then Redis expires
them; training jobs have none and are kept.

Submitting is one Lua script, so a job is either recorded, queued and indexed, or not at all.
Trainers read the tenants' queues round robin (`JobQueue`), so one tenant's backlog never starves
another's first job. An entry is acknowledged and deleted once its job has a result; the tenant
leaves the set when its queue is empty.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from shared.errors import FailedPreconditionError, NotFoundError, UnavailableError
from shared.job_limits import JobLimits

log = logging.getLogger(__name__)

GROUP = "trainers"
# The spec "kind" of an explanation job; training jobs have none. Both share a family's queue and trainers.
EXPLAIN = "explain"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
INDEX = "maas:jobs:index"
# An entry handed back is marked idle for this long, so any trainer's XAUTOCLAIM takes it at once.
HANDED_BACK_IDLE_MS = 10 * 365 * 24 * 3600 * 1000

_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {existing, 0} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(cjson.decode(ARGV[3])))
redis.call('XADD', KEYS[3], '*', unpack(cjson.decode(ARGV[4])))
-- The group exists before the tenant's first entry, so no entry is ever skipped.
redis.pcall('XGROUP', 'CREATE', KEYS[4], ARGV[6], '0', 'MKSTREAM')
redis.call('XADD', KEYS[4], '*', 'job_id', ARGV[1])
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return {ARGV[1], 1}
"""

# Acknowledges and deletes an entry; a tenant whose queue is then empty leaves the set.
_ACK = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[4] == '1' and redis.call('XLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[3]) end
return 1
"""


# Sets the finished job's keys to expire after the TTL it was submitted with; no TTL, nothing expires.
_EXPIRE_FINISHED = """
local fields = redis.call('HMGET', KEYS[1], 'result_ttl_s', 'idempotency')
local ttl = tonumber(fields[1])
if not ttl or ttl <= 0 then return 0 end
local ms = math.max(1, math.floor(ttl * 1000))
redis.call('PEXPIRE', KEYS[1], ms)
redis.call('PEXPIRE', KEYS[2], ms)
redis.call('PEXPIRE', KEYS[3], ms)
if fields[2] then redis.call('PEXPIRE', fields[2], ms) end
return ms
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def result_key(job_id: str) -> str:
    """A job's result bytes, when it makes one (an explanation's response)."""
    return f"maas:job:{job_id}:result"


def job_key(job_id: str) -> str:
    return f"maas:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"maas:job:{job_id}:events"


def queue_key(family: str, tenant: str) -> str:
    return f"maas:jobs:{family}:t:{tenant}"


def tenants_key(family: str) -> str:
    return f"maas:jobs:{family}:tenants"


def legacy_queue_key(family: str) -> str:
    return f"maas:jobs:{family}"


def dead_letter_key(family: str) -> str:
    return f"maas:jobs:{family}:dead"


def limits_key(family: str) -> str:
    return f"maas:jobs:{family}:limits"


def idempotency_record_key(tenant: str, key: str) -> str:
    return f"maas:jobs:idempotency:{len(tenant)}:{tenant}:{key}"


def _flatten(fields: dict[str, Any]) -> list[str]:
    flat = []
    for key, value in fields.items():
        flat += [key, value if isinstance(value, str) else json.dumps(value)]
    return flat


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in fields.items()}


def decode_record(raw: dict[bytes, bytes]) -> dict[str, Any]:
    record = {key.decode(): value.decode() for key, value in raw.items()}
    for key in ("spec", "metrics"):
        record[key] = json.loads(record.get(key) or "{}")
    for key in ("epoch", "epochs", "model_version", "attempts"):
        record[key] = int(record.get(key) or 0)
    record["train_loss"] = float(record.get("train_loss") or 0.0)
    record["run_s"] = float(record.get("run_s") or 0.0)
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


def _stage_update(pipe, job_id: str, state: str, message: str, event: dict[str, Any] | None, fields: dict) -> None:
    """Queues the record's new fields and, when there is something to tell, an event, on a MULTI pipeline."""
    pipe.hset(job_key(job_id), mapping=_encode(fields))
    if event is not None or message or "state" in fields:
        record = {"job_id": job_id, "state": state, "message": message, "time": fields["updated_at"], **(event or {})}
        pipe.xadd(events_key(job_id), _encode(record))


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._submit = client.register_script(_SUBMIT)
        self.ack_script = client.register_script(_ACK)
        self._expire_finished = client.register_script(_EXPIRE_FINISHED)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        # After a restart or failover every pooled connection is stale once: such a command is sent again, on a
        # new connection (it never reached the new server). Redis still down after the retries raises.
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3)
        return cls(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=30, health_check_interval=10,
                                        retry=retry, retry_on_error=[redis.ConnectionError]))  # fmt: skip

    async def close(self) -> None:
        await self.redis.aclose()

    async def submit(
        self, family: str, spec: dict[str, Any], idempotency_key: str = "", tenant: str = "",
        result_ttl_s: float = 0.0,
    ) -> tuple[str, bool]:  # fmt: skip
        """Records and queues a job; returns (job_id, created). A key the tenant used before returns that job.

        With `result_ttl_s`, the finished job (its result included) expires that long after it finishes."""
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        key = idempotency_record_key(tenant, idempotency_key or job_id)
        stamp = now_iso()
        record = {
            "job_id": job_id, "family": family, "spec": spec, "state": "QUEUED", "epochs": spec.get("epochs", 0),
            "attempts": 0, "created_at": stamp, "updated_at": stamp, "tenant": tenant,
        }  # fmt: skip
        if result_ttl_s > 0:
            record |= {"result_ttl_s": repr(float(result_ttl_s)), "idempotency": key}
        event = {"job_id": job_id, "state": "QUEUED", "message": "accepted and queued", "time": stamp}
        keys = [key, job_key(job_id), events_key(job_id), queue_key(family, tenant), INDEX, tenants_key(family)]
        try:
            found, created = await self._submit(
                keys=keys,
                args=[job_id, time.time(), json.dumps(_flatten(record)), json.dumps(_flatten(event)), tenant, GROUP],
            )
        except (redis.RedisError, OSError) as exc:
            raise UnavailableError(f"the job queue is unavailable, nothing was queued: {exc}") from None
        return found.decode() if isinstance(found, bytes) else found, bool(created)

    async def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job's record; with a tenant, another tenant's job is NOT_FOUND, as if it did not exist.

        Only a record that is not there is NOT_FOUND: a Redis error is raised as it is."""
        raw = await self.redis.hgetall(job_key(job_id))
        if not raw or (tenant is not None and raw.get(b"tenant", b"").decode() != tenant):
            raise NotFoundError(f"job {job_id!r} not found")
        return decode_record(raw)

    async def list(self, family: str = "", limit: int = 100, tenant: str | None = None) -> list[dict[str, Any]]:
        ids = await self.redis.zrevrange(INDEX, 0, -1 if family or tenant is not None else limit - 1)
        records = []
        for job_id in ids:
            raw = await self.redis.hgetall(job_key(job_id.decode()))
            if not raw:
                await self.redis.zrem(INDEX, job_id)  # an expired job leaves the index when it is next listed
                continue
            if (tenant is not None and raw.get(b"tenant", b"").decode() != tenant):
                continue
            if not family or raw.get(b"family", b"").decode() == family:
                records.append(decode_record(raw))
                if len(records) >= limit:
                    break
        return records

    async def update(self, job_id: str, event_message: str = "", event: dict[str, Any] | None = None,
                     result: bytes | None = None, **fields) -> None:  # fmt: skip
        """Updates the record and appends an event (and stores a result), in one transaction; a job that
        finishes with a result TTL starts expiring in that same transaction."""
        fields["updated_at"] = now_iso()
        state = fields.get("state", "")
        if not state and (event is not None or event_message):
            state = (await self.redis.hget(job_key(job_id), "state") or b"").decode()
        async with self.redis.pipeline(transaction=True) as pipe:
            if result is not None:
                pipe.set(result_key(job_id), result)
            _stage_update(pipe, job_id, state, event_message, event, fields)
            if fields.get("state") in TERMINAL:
                await self._expire_finished(keys=[job_key(job_id), events_key(job_id), result_key(job_id)],
                                            client=pipe)  # fmt: skip
            await pipe.execute()

    async def result(self, job_id: str) -> bytes | None:
        return await self.redis.get(result_key(job_id))

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

    async def history(self, job_id: str, after: str = "0-0") -> list[tuple[str, dict]]:
        """Events after the given stream id (JobEventFeed waits for new ones)."""
        entries = await self.redis.xrange(events_key(job_id), min=f"({after}" if after != "0-0" else "-")
        return [(entry_id.decode(), decode_event(fields)) for entry_id, fields in entries]

    async def publish_limits(self, family: str, limits: JobLimits) -> None:
        """What this family's trainers enforce, for the gateway's check at submit."""
        await self.redis.hset(limits_key(family), mapping=limits.to_fields())

    async def limits(self, family: str) -> JobLimits:
        """The limits the family's trainers published; the defaults while none has started."""
        try:
            raw = await self.redis.hgetall(limits_key(family))
        except (redis.RedisError, OSError) as exc:
            raise UnavailableError(f"the job queue is unavailable, nothing was queued: {exc}") from None
        return JobLimits.from_fields(raw) if raw else JobLimits.defaults()


@dataclass(frozen=True)
class QueueEntry:
    """One delivered entry: the stream it came from, whose tenant it is (None: the legacy stream)."""

    stream: str
    tenant: str | None
    entry_id: str
    job_id: str


class JobQueue:
    """How one trainer reads its family's queues: round robin over the tenants, in the consumer group.

    Each call of `next` looks, in this order: at its own unacknowledged entries (after a start, or a
    Redis error), at entries another trainer left idle for `claim_idle_ms` or handed back
    (XAUTOCLAIM), then at new entries; each of those scans starts at the tenant after the one
    served last. With nothing to do it blocks on every tenant's queue for up to `block_ms`.
    """

    def __init__(self, jobs: JobStore, family: str, consumer: str, claim_idle_ms: int, block_ms: int) -> None:
        self.jobs = jobs
        self.redis = jobs.redis
        self.family = family
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.check_own_pending = True
        self._own_after: dict[str, str] = {}
        self._served_last = ""

    async def streams(self) -> list[tuple[str, str | None]]:
        """(stream, tenant) of every queue with entries, starting after the one served last."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(tenants_key(self.family))
            pipe.exists(legacy_queue_key(self.family))
            members, legacy = await pipe.execute()
        found = sorted((queue_key(self.family, t.decode()), t.decode()) for t in members)
        if legacy:
            found.append((legacy_queue_key(self.family), None))
            found.sort()
        start = bisect.bisect_right([key for key, _ in found], self._served_last)
        return found[start:] + found[:start]

    async def next(self) -> QueueEntry | None:
        streams = await self.streams()
        if not streams:
            await asyncio.sleep(self.block_ms / 1000)
            return None
        if self.check_own_pending:
            # Each of our own unacknowledged entries once per sweep; then back to normal reading.
            for stream, tenant in streams:
                entry = await self._read(stream, tenant, self._own_after.get(stream, "0"))
                if entry is not None:
                    self._own_after[stream] = entry.entry_id
                    return entry
            self.check_own_pending = False
            self._own_after.clear()
        for stream, tenant in streams:
            entry = await self._claim(stream, tenant)
            if entry is not None:
                log.info("took over %s (job %s) from a trainer that stopped or went silent", entry.entry_id,
                         entry.job_id)  # fmt: skip
                return entry
        for stream, tenant in streams:
            entry = await self._read(stream, tenant, ">")
            if entry is not None:
                return entry
        return await self._wait(streams)

    async def _read(self, stream: str, tenant: str | None, start: str) -> QueueEntry | None:
        reply = await self._guarded(stream, self.redis.xreadgroup(GROUP, self.consumer, {stream: start}, count=1))
        if reply and reply[0][1]:
            return await self._served(stream, tenant, reply[0][1][0])
        return None

    async def _claim(self, stream: str, tenant: str | None) -> QueueEntry | None:
        claimed = await self._guarded(
            stream, self.redis.xautoclaim(stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=1)
        )
        if claimed and claimed[1]:
            return await self._served(stream, tenant, claimed[1][0])
        return None

    async def _wait(self, streams: list[tuple[str, str | None]]) -> QueueEntry | None:
        tenants = dict(streams)
        try:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, {stream: ">" for stream in tenants}, count=1, block=self.block_ms
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return None  # a queue went away while we looked; the next round sees the new set
        delivered = [(stream.decode(), raw) for stream, entries in reply or [] for raw in entries]
        if not delivered:
            return None
        # Rarely, entries of several tenants arrive in one read: serve the first, hand back the rest.
        for stream, raw in delivered[1:]:
            await self.release(QueueEntry(stream, tenants[stream], raw[0].decode(), ""))
        stream, raw = delivered[0]
        return await self._served(stream, tenants[stream], raw)

    async def _served(self, stream: str, tenant: str | None, raw) -> QueueEntry | None:
        entry_id, fields = raw[0].decode(), raw[1]
        self._served_last = stream
        if not fields or b"job_id" not in fields:  # an entry deleted while pending carries nothing
            await self.ack(QueueEntry(stream, tenant, entry_id, ""))
            return None
        return QueueEntry(stream, tenant, entry_id, fields[b"job_id"].decode())

    async def _guarded(self, stream: str, command):
        """A command on one queue; a queue that lost its group (never made by this version) gets one back."""
        try:
            return await command
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            with contextlib.suppress(redis.ResponseError):
                await self.redis.xgroup_create(stream, GROUP, id="0")
            return None

    async def ack(self, entry: QueueEntry) -> None:
        """The entry's job has its result: acknowledged and deleted, in one script."""
        tenant = entry.tenant if entry.tenant is not None else ""
        await self.jobs.ack_script(
            keys=[entry.stream, tenants_key(self.family)],
            args=[GROUP, entry.entry_id, tenant, "1" if entry.tenant is not None else "0"],
        )

    async def keep_claimed(self, entry: QueueEntry) -> None:
        """Resets the entry's idle time, so no other trainer takes over a job that is running."""
        await self.redis.xclaim(entry.stream, GROUP, self.consumer, 0, [entry.entry_id], justid=True)

    async def release(self, entry: QueueEntry) -> None:
        """Makes an entry this trainer holds claimable by any trainer at once, costing its job nothing."""
        await self.redis.xclaim(
            entry.stream, GROUP, self.consumer, 0, [entry.entry_id], idle=HANDED_BACK_IDLE_MS, justid=True
        )

    async def hand_back(self, entry: QueueEntry, message: str, **fields) -> None:
        """A stopping trainer's job goes back to the queue (first in line) with its record, in one transaction."""
        fields["updated_at"] = now_iso()
        async with self.redis.pipeline(transaction=True) as pipe:
            _stage_update(pipe, entry.job_id, fields.get("state", ""), message, None, fields)
            pipe.xclaim(entry.stream, GROUP, self.consumer, 0, [entry.entry_id], idle=HANDED_BACK_IDLE_MS,
                        justid=True)  # fmt: skip
            await pipe.execute()

    async def dead_letter(self, entry: QueueEntry, error: str) -> None:
        await self.redis.xadd(dead_letter_key(self.family), {"job_id": entry.job_id, "entry_id": entry.entry_id,
                                                             "error": error})  # fmt: skip
        await self.ack(entry)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Watcher:
    job_id: str
    after: str
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)


class JobEventFeed:
    """New events of every job a process's WatchJob calls follow, read by one blocking XREAD.

    However many calls watch, they hold one Redis connection between them (not one each): a reader
    task, started with the first watcher and ending with the last, reads every watched job's events
    stream at once and hands each watcher what is new to it. A watcher that subscribes while the
    read is blocked is included in the next one, at most `block_ms` later, from where it left off.
    """

    def __init__(self, client: redis.Redis, block_ms: int = 250, count: int = 100) -> None:
        self.redis = client
        self.block_ms = block_ms
        self.count = count
        self._watchers: set[_Watcher] = set()
        self._reader: asyncio.Task | None = None

    @property
    def watching(self) -> int:
        return len(self._watchers)

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str, after: str) -> AsyncIterator[asyncio.Queue]:
        """A queue of lists of (entry id, event) newer than `after`; a Redis failure arrives as its exception."""
        watcher = _Watcher(job_id, after)
        self._watchers.add(watcher)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        try:
            yield watcher.updates
        finally:
            self._watchers.discard(watcher)

    async def _read(self) -> None:
        while self._watchers:
            watchers = list(self._watchers)
            streams: dict[str, str] = {}
            for watcher in watchers:
                key = events_key(watcher.job_id)
                if key not in streams or _stream_id(watcher.after) < _stream_id(streams[key]):
                    streams[key] = watcher.after
            try:
                reply = await self.redis.xread(streams, count=self.count, block=self.block_ms)
            except (redis.RedisError, OSError) as exc:
                for watcher in watchers:
                    watcher.updates.put_nowait(exc)
                await asyncio.sleep(1.0)
                continue
            for stream, entries in reply or []:
                decoded = [(entry_id.decode(), decode_event(fields)) for entry_id, fields in entries]
                job_id = stream.decode().removeprefix("maas:job:").removesuffix(":events")
                for watcher in watchers:
                    if watcher.job_id != job_id:
                        continue
                    new = [(eid, event) for eid, event in decoded if _stream_id(eid) > _stream_id(watcher.after)]
                    if new:
                        watcher.after = new[-1][0]
                        watcher.updates.put_nowait(new)
