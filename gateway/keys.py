"""maas.keys.v1.KeyService at the gateway, for admins: key rotation and key status of every store.

The gateway mounts the data-set store and rotates it itself; the model store is mounted read-write
by the model services, so each is asked (its own KeyService) to rotate its family's models. A store
that fails is reported with its errors, and the others are rotated all the same: rotation is
idempotent, so the call is simply made again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.auth import require_admin
from gateway.backends import Backend
from gateway.settings import GatewaySettings
from maas.keys.v1 import keys_pb2, keys_pb2_grpc
from shared.datasets import DatasetStore
from shared.errors import FailedPreconditionError, InvalidArgumentError, UpstreamError
from shared.key_servicer import SERVICE_NAME, rotation_target, to_store_keys, to_store_rotation
from shared.keyring import Keyring

log = logging.getLogger(__name__)

DATASETS = "datasets"
# How long a rotation or listing waits for a service whose channel is reconnecting (it restarted a moment ago).
RESTART_WAIT_S = 10.0
KEY_SERVICE = SERVICE_NAME


def dataset_store(settings: GatewaySettings) -> DatasetStore:
    """The data-set store with this gateway's KEKs: uploads are sealed as they stream in."""
    return DatasetStore(settings.dataset_dir, Keyring.from_settings(settings))


class GatewayKeyService(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, datasets: DatasetStore, backends: dict[str, Backend], timeout: Callable) -> None:
        self.datasets = datasets
        self.backends = backends
        self.timeout = timeout  # the call's remaining time, less the gateway's margin
        (log.info if datasets.encrypted else log.warning)(
            "data-set store %s: %s", datasets.root, datasets.keyring.describe()
        )

    async def RotateKeys(self, request: keys_pb2.RotateKeysRequest, context):
        require_admin("RotateKeys")
        kek_id, tenant = rotation_target(request)
        if tenant is not None and "\n" in tenant:
            raise InvalidArgumentError("tenant: must not hold a line break")
        keyring = self.datasets.keyring
        if not keyring.enabled:
            raise FailedPreconditionError(
                "RotateKeys: encryption is off at the gateway; set MAAS_GATEWAY_KEYS_DIR and MAAS_GATEWAY_KEK_ID"
            )
        if not keyring.has(kek_id):
            raise FailedPreconditionError(
                f"to_kek_id: KEK {kek_id!r} is not in the keys directory (it holds {keyring.ids() or 'no KEK'}); "
                "add it to every process's keys directory (the Secret) first"
            )
        log.info("rotating data keys to KEK %s%s", kek_id, f" for tenant {tenant}" if tenant is not None else "")
        report = await asyncio.to_thread(self.datasets.rewrap, kek_id, tenant)
        stores = [to_store_rotation(DATASETS, report)]
        replies = await self._ask_services("RotateKeys", request, keys_pb2.RotateKeysResponse, context)
        for family, reply in replies.items():
            if isinstance(reply, Exception):
                stores.append(keys_pb2.StoreRotation(store=f"models:{family}", errors=[_reason(reply)]))
            else:
                stores.extend(reply.stores)
        for store in stores:
            log.info("rotation of %s: %d re-wrapped, %d unchanged, %d plain, %d errors", store.store,
                     store.rewrapped, store.unchanged, store.plain, len(store.errors))  # fmt: skip
        return keys_pb2.RotateKeysResponse(stores=stores)

    async def ListKeys(self, request: keys_pb2.ListKeysRequest, context):
        require_admin("ListKeys")
        usage = await asyncio.to_thread(self.datasets.key_usage)
        stores = [to_store_keys(DATASETS, self.datasets.keyring, usage)]
        replies = await self._ask_services("ListKeys", request, keys_pb2.ListKeysResponse, context)
        for family, reply in replies.items():
            if isinstance(reply, Exception):
                stores.append(keys_pb2.StoreKeys(store=f"models:{family}", errors=[_reason(reply)]))
            else:
                stores.extend(reply.stores)
        return keys_pb2.ListKeysResponse(stores=stores)

    async def _ask_services(self, method: str, request, response_type, context) -> dict[str, object]:
        timeout, path, raw = self.timeout(context), f"/{SERVICE_NAME}/{method}", request.SerializeToString()
        families = list(self.backends)

        async def ask(backend: Backend) -> bytes:
            # A service restarted a moment ago, its channel still reconnecting, is waited for a little rather
            # than reported as an error that leaves a rotation incomplete; one that is down fails soon.
            await backend.wait_ready(min(timeout, RESTART_WAIT_S))
            return await backend.call(path, raw, timeout)

        replies = await asyncio.gather(*(ask(self.backends[f]) for f in families), return_exceptions=True)
        return {
            family: response_type.FromString(reply) if isinstance(reply, bytes) else reply
            for family, reply in zip(families, replies, strict=True)
        }


def _reason(error: BaseException) -> str:
    if isinstance(error, UpstreamError):
        return f"{error.code.name}: {error.message}"
    return f"{type(error).__name__}: {error}"
