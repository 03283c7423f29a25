"""maas.models.v1.ModelService at the gateway: every model, whatever its family, by name.

Each call goes to the service of the family that owns the model, found through the catalog
(loaded models) or, for a model no service has loaded, by asking every service which one has
it in the store. Other tenants' private models are NOT_FOUND, exactly like models that do not
exist. Changing a model (load, unload, default, canary, shadow) needs the admin role, or owning the model (a
private one): a tenant cannot unload a public model for everyone. After a change the family's
catalog is read again at once.
"""

from __future__ import annotations

import asyncio

import grpc

from gateway.auth import current_principal, current_tenant
from gateway.backends import Backend
from gateway.catalog import ModelCatalog
from maas.common.v1 import model_pb2
from maas.models.v1 import models_pb2, models_pb2_grpc
from shared.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError, UpstreamError
from shared.families import BY_NAME

SERVICE_NAME = models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


class GatewayModelService(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, backends: dict[str, Backend], catalog: ModelCatalog, timeout: callable) -> None:
        self.backends = backends
        self.catalog = catalog
        self.timeout = timeout  # the call's remaining time, less the gateway's margin

    async def ListModels(self, request: models_pb2.ListModelsRequest, context):
        if request.family and request.family not in BY_NAME:
            raise InvalidArgumentError(f"family: {request.family!r} is not one of {sorted(BY_NAME)}")
        families = [request.family] if request.family else list(self.backends)
        timeout = self.timeout(context)
        replies = await asyncio.gather(
            *(self.backends[f].models("ListModels", request.SerializeToString(), timeout) for f in families)
        )
        tenant = current_tenant()
        models = [
            model
            for raw in replies
            for model in models_pb2.ListModelsResponse.FromString(raw).models
            if self.catalog.visible(model, tenant)
        ]
        return models_pb2.ListModelsResponse(models=sorted(models, key=lambda m: m.name))

    async def GetModel(self, request, context):
        family = await self.loaded_family(request.model_name)
        raw = await self.backends[family].models("GetModel", request.SerializeToString(), self.timeout(context))
        reply = models_pb2.GetModelResponse.FromString(raw)
        self._check_visible(request.model_name, reply.model.versions)
        return reply

    async def ListModelVersions(self, request, context):
        _, reply = await self.stored(request.model_name, self.timeout(context))
        return reply

    async def LoadModel(self, request, context):
        family, versions = await self.stored(request.model_name, self.timeout(context))
        _may_change(request.model_name, _owner(versions.versions), "LoadModel")
        return await self._change(family, "LoadModel", request, models_pb2.LoadModelResponse, context)

    async def UnloadModel(self, request, context):
        family = await self.loaded_family(request.model_name)
        _may_change(request.model_name, self.catalog.owner_of(family, request.model_name), "UnloadModel")
        return await self._change(family, "UnloadModel", request, models_pb2.UnloadModelResponse, context)

    async def SetDefaultVersion(self, request, context):
        family = await self.loaded_family(request.model_name)
        _may_change(request.model_name, self.catalog.owner_of(family, request.model_name), "SetDefaultVersion")
        return await self._change(family, "SetDefaultVersion", request, models_pb2.SetDefaultVersionResponse, context)

    async def SetCanary(self, request, context):
        family = await self.loaded_family(request.model_name)
        _may_change(request.model_name, self.catalog.owner_of(family, request.model_name), "SetCanary")
        return await self._change(family, "SetCanary", request, models_pb2.SetCanaryResponse, context)

    async def SetShadow(self, request, context):
        family = await self.loaded_family(request.model_name)
        _may_change(request.model_name, self.catalog.owner_of(family, request.model_name), "SetShadow")
        return await self._change(family, "SetShadow", request, models_pb2.SetShadowResponse, context)

    async def _change(self, family: str, method: str, request, response_type, context):
        try:
            raw = await self.backends[family].models(method, request.SerializeToString(), self.timeout(context))
        finally:
            await self.catalog.refresh(family)
        return response_type.FromString(raw)

    async def loaded_family(self, name: str) -> str:
        """The family of a loaded model the caller may see."""
        _require_name(name)
        family, _ = await self.catalog.find_visible(name, current_tenant())
        return family

    async def stored(self, name: str, timeout: float) -> tuple[str, models_pb2.ListModelVersionsResponse]:
        """(family, versions) of a model in the store, loaded or not: the one service that has it answers."""
        _require_name(name)
        request = models_pb2.ListModelVersionsRequest(model_name=name).SerializeToString()
        families = list(self.backends)
        replies = await asyncio.gather(
            *(self.backends[f].models("ListModelVersions", request, timeout) for f in families), return_exceptions=True
        )
        for family, reply in zip(families, replies, strict=True):
            if isinstance(reply, bytes):
                versions = models_pb2.ListModelVersionsResponse.FromString(reply)
                self._check_visible(name, versions.versions)
                return family, versions
        errors = [r for r in replies if isinstance(r, BaseException)]
        unexpected = [e for e in errors if not (isinstance(e, UpstreamError) and e.code == grpc.StatusCode.NOT_FOUND)]
        if unexpected:
            raise unexpected[0]
        raise NotFoundError(f"model {name!r} not found")

    @staticmethod
    def _check_visible(name: str, versions: list[model_pb2.ModelVersion]) -> None:
        if _owner(versions) not in ("", current_tenant()):
            raise NotFoundError(f"model {name!r} not found")


def _owner(versions) -> str:
    return next((v.owner for v in versions if v.owner), "")


def _may_change(name: str, owner: str, what: str) -> None:
    """Admins change any model; a tenant only its own private ones (others' are NOT_FOUND before this)."""
    if current_principal().admin or (owner and owner == current_tenant()):
        return
    raise PermissionDeniedError(
        f"{what}: {name!r} is a public model; changing it needs an API key with the admin role"
    )


def _require_name(name: str) -> None:
    if not name:
        raise InvalidArgumentError("model_name: required")
