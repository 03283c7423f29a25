"""maas.keys.v1.KeyService for one family's models in the model store: every model service serves it,
and the gateway calls it (the gateway checks the caller is an admin; the services are internal)."""

from __future__ import annotations

import asyncio

from maas.keys.v1 import keys_pb2, keys_pb2_grpc
from shared.keyring import Keyring, KeyUsage, RewrapReport, check_kek_id
from shared.model_store import ModelStore

SERVICE_NAME = keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name


def to_store_rotation(store: str, report: RewrapReport) -> keys_pb2.StoreRotation:
    return keys_pb2.StoreRotation(
        store=store, rewrapped=report.rewrapped, unchanged=report.unchanged, plain=report.plain, errors=report.errors
    )


def to_store_keys(store: str, keyring: Keyring, usage: KeyUsage) -> keys_pb2.StoreKeys:
    return keys_pb2.StoreKeys(
        store=store,
        encrypted=keyring.enabled,
        active_kek_id=usage.active_kek_id,
        tenant_kek_ids=usage.tenant_kek_ids,
        available_kek_ids=keyring.ids(),
        data_keys_by_kek=dict(usage.by_kek),
        plain=usage.plain,
        errors=usage.errors,
    )


def rotation_target(request: keys_pb2.RotateKeysRequest) -> tuple[str, str | None]:
    """(KEK id, tenant or None) of a RotateKeys request, checked."""
    return check_kek_id(request.to_kek_id, "to_kek_id"), request.tenant or None


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, store: ModelStore, family: str, extra_stores: dict[str, ModelStore] | None = None) -> None:
        self.store = store
        self.family = family
        # Other stores of this service that seal with the same keys, by kind (the gnn service's "graphs").
        self.extra_stores = extra_stores or {}

    @property
    def name(self) -> str:
        return f"models:{self.family}"

    def _stores(self) -> list[tuple[str, ModelStore]]:
        extra = [(f"{kind}:{self.family}", store) for kind, store in self.extra_stores.items()]
        return [(self.name, self.store), *extra]

    async def RotateKeys(self, request, context):
        kek_id, tenant = rotation_target(request)
        rotations = []
        for name, store in self._stores():
            # File work, off the event loop: serving goes on while headers are rewritten.
            report = await asyncio.to_thread(store.rewrap, kek_id, tenant, self.family)
            rotations.append(to_store_rotation(name, report))
        return keys_pb2.RotateKeysResponse(stores=rotations)

    async def ListKeys(self, request, context):
        stores = []
        for name, store in self._stores():
            usage = await asyncio.to_thread(store.key_usage, self.family)
            stores.append(to_store_keys(name, store.keyring, usage))
        return keys_pb2.ListKeysResponse(stores=stores)
