"""Payload logging: sampled request/response records per model, in a Redis Stream, as CloudEvents.

Off by default. `MAAS_GATEWAY_PAYLOAD_LOGGING` maps model names (or "*" for the rest) to the share
of calls to log, 0 to 1; which calls is a hash of the request id, so a sample is the same in every
gateway worker. A model whose manifest says `"payload_logging": false` is never logged, whatever the
setting. Each record is one structured-mode CloudEvent (JSON) with the caller's request and the
response it got, as they were seen on the family's data plane (gRPC, Open Inference and REST calls
alike), tensors decoded to lists:

- feature columns the model's training job masked are logged as null, and texts with e-mail
  addresses, phone and card numbers redacted, as in the logs; a tensor of more than 65,536
  elements is logged by its datatype and shape only;
- with encryption on (the gateway's KEKs), each record is sealed like an upload: AES-256-GCM under
  a data key of its own, wrapped by the tenant's KEK (`KekPolicy` of the data-set store), bound to
  its stream; the model services that read records (drift checks) open them with the same KEKs;
- records are tagged with the caller's tenant and kept per tenant and model, in
  `maas:v1:payloads:<tenant>:<model>` on the job queue's Redis (capped at
  `MAAS_GATEWAY_PAYLOAD_LOG_MAX_LEN` entries, oldest dropped); `GatewayService.ReadPayloads` gives
  a tenant its own records, and an admin any tenant's.

Writing never delays or fails the call it records: records wait in a bounded queue for one writer
task, and a record the queue has no room for, or that Redis refuses, is dropped and counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from google.protobuf.message import Message
from prometheus_client import Counter

from maas.common.v1 import tensor_pb2
from shared.errors import FailedPreconditionError, MaasError
from shared.keyring import DATA_KEY_BYTES, KekPolicy, Keyring
from shared.payload_streams import sealing_context, stream_key
from shared.redaction import redact
from shared.tensors import to_numpy

log = logging.getLogger(__name__)

PAYLOADS = Counter(
    "maas_gateway_payload_records_total",
    "Payload records by outcome: logged, dropped (the queue was full) or error (Redis refused it)",
    ["model", "outcome"],
)
EVENT_TYPE = "dev.maas.inference.payload.v1"
QUEUE_SIZE = 1024
# A tensor larger than this is recorded by its datatype and shape only: a record is made on the call's
# event loop, and a huge one would hold up the calls behind it.
MAX_LOGGED_ELEMENTS = 65_536
TENSOR = tensor_pb2.Tensor.DESCRIPTOR


def open_record(fields: dict[bytes, bytes], key: str | bytes, keyring: Keyring | None) -> str:
    """A stream entry's CloudEvent JSON, opened with `keyring` when it was sealed."""
    if b"event" in fields:
        return fields[b"event"].decode()
    if keyring is None:
        raise FailedPreconditionError("payload records are sealed, and this gateway has no keys (KEYS_DIR, KEK_ID)")
    plaintext, _, _ = keyring.open(fields[b"sealed"], sealing_context(key), "a payload record")
    return plaintext.decode()


def payload_share(request_id: str) -> float:
    """Where the request id falls for payload sampling, in [0, 1): the same in every gateway."""
    digest = hashlib.blake2b(f"payload/{request_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % 1_000_000) / 1_000_000


def sampled(rate: float, request_id: str) -> bool:
    """Whether the call with this id is in a sample of `rate` (0 to 1)."""
    return rate >= 1 or payload_share(request_id) < rate


def tensor_json(tensor: tensor_pb2.Tensor, field: str, masked: frozenset[int] = frozenset(),
                datatype: str = "") -> dict:  # fmt: skip
    """A tensor as {"datatype", "shape", "data"}: data a nested list, masked last-axis columns null."""
    datatype = datatype or tensor_pb2.DataType.Name(tensor.dtype).removeprefix("DATA_TYPE_")
    elements = math.prod(tensor.shape)
    if elements > MAX_LOGGED_ELEMENTS:
        return {"datatype": datatype, "shape": list(tensor.shape), "data_omitted": f"{elements} elements"}
    try:
        array = to_numpy(tensor, field)
    except MaasError:  # strings, or bytes that do not match the shape: kept as base64
        encoded = base64.b64encode(tensor.data).decode()
        return {"datatype": datatype, "shape": list(tensor.shape), "data_base64": encoded}
    data = array.tolist()
    if masked and array.ndim >= 1:
        width = array.shape[-1]
        columns = [c for c in masked if c < width]
        if columns:
            data = _null_columns(data, columns, array.ndim)
    return {"datatype": datatype, "shape": list(tensor.shape), "data": data}


def _null_columns(data, columns: list[int], ndim: int):
    if ndim == 1:
        return [None if i in columns else value for i, value in enumerate(data)]
    return [_null_columns(row, columns, ndim - 1) for row in data]


def message_json(message: Message, masked: frozenset[int] = frozenset(), path: str = "") -> dict:
    """A family request or response as JSON: tensors decoded, strings redacted, bytes as base64."""
    out: dict = {}
    for field, value in message.ListFields():
        where = f"{path}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(value_field, item, masked, f"{where}[{k!r}]") for k, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, item, masked, f"{where}[{i}]") for i, item in enumerate(value)]
        else:
            out[field.name] = _value(field, value, masked, where)
    return out


def _value(field, value, masked: frozenset[int], where: str):
    if field.message_type is TENSOR:
        return tensor_json(value, where, masked)
    if field.message_type is not None:
        return message_json(value, masked, f"{where}.")
    if field.type == field.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if field.type == field.TYPE_STRING:
        return redact(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    return value


def cloud_event(request_id: str, tenant: str, model: str, version: int, protocol: str, request: dict,
                response: dict) -> dict:  # fmt: skip
    return {
        "specversion": "1.0",
        "id": request_id,
        "source": "maas/gateway",
        "type": EVENT_TYPE,
        "subject": model,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "maastenant": tenant,
        "maasmodel": model,
        "maasversion": str(version),
        "maasprotocol": protocol,
        "data": {"request": request, "response": response},
    }


@dataclass
class Record:
    tenant: str
    model: str
    event: dict


class PayloadLog:
    """Sampled records of calls, written in the background to one Redis Stream per tenant and model."""

    def __init__(self, redis_url: str | None, rates: dict[str, float], max_len: int) -> None:
        self.rates = rates
        self.max_len = max_len
        self._redis = (aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
                       if redis_url and rates else None)  # fmt: skip
        self._queue: asyncio.Queue[Record] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._writer: asyncio.Task | None = None
        self.keyring: Keyring | None = None
        self.policy: KekPolicy | None = None

    def seal_with(self, keyring: Keyring, policy: KekPolicy) -> None:
        """Seals records from now on (when `keyring` is enabled), each tenant's under its KEK."""
        if keyring.enabled:
            self.keyring, self.policy = keyring, policy

    def _fields(self, record: Record) -> dict[str, bytes]:
        event = json.dumps(record.event).encode()
        if self.keyring is None:
            return {"event": event}
        kek_id = self.policy.for_owner(record.tenant)
        key = stream_key(record.tenant, record.model)
        return {"sealed": self.keyring.seal(event, kek_id, os.urandom(DATA_KEY_BYTES),
                                        sealing_context(key))}  # fmt: skip

    def rate(self, model: str) -> float:
        if self._redis is None:
            return 0.0
        return float(self.rates.get(model, self.rates.get("*", 0.0)))

    def offer(self, record: Record) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            PAYLOADS.labels(record.model, "dropped").inc()

    async def _write(self) -> None:
        while True:
            record = await self._queue.get()
            try:
                fields = await asyncio.to_thread(self._fields, record)  # KEK files are read, not cached
                await self._redis.xadd(stream_key(record.tenant, record.model), fields, maxlen=self.max_len,
                                       approximate=True)  # fmt: skip
                PAYLOADS.labels(record.model, "logged").inc()
            except (aioredis.RedisError, OSError, MaasError) as exc:
                PAYLOADS.labels(record.model, "error").inc()
                log.warning("payload record for %s dropped: %s", record.model, exc)

    async def read(self, tenant: str, model: str, after: str, limit: int) -> tuple[list[tuple[str, str]], str]:
        """Up to `limit` (id, CloudEvent JSON) of the tenant's records of `model` after the id `after`,
        oldest first, and the id to read on from."""
        if self._redis is None:
            return [], after
        start = f"({after}" if after else "-"
        key = stream_key(tenant, model)
        entries = await self._redis.xrange(key, min=start, max="+", count=limit)

        def opened() -> list[tuple[str, str]]:
            return [(entry_id.decode(), open_record(fields, key, self.keyring)) for entry_id, fields in entries]

        records = await asyncio.to_thread(opened)
        return records, records[-1][0] if records else after

    async def drain(self, within_s: float = 2.0) -> None:
        """Writes what is queued (for up to `within_s`), then stops."""
        deadline = time.monotonic() + within_s
        while not self._queue.empty() and time.monotonic() < deadline and self._writer is not None:
            await asyncio.sleep(0.01)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._redis is not None:
            await self._redis.aclose()
