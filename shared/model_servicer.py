"""maas.models.v1.ModelService for one family's model repository: every model service serves it."""

from __future__ import annotations

from maas.models.v1 import models_pb2, models_pb2_grpc
from shared.errors import FailedPreconditionError, InvalidArgumentError
from shared.families import BY_NAME
from shared.model_repository import ModelRepository, State

SERVICE_NAME = models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def ListModels(self, request, context):
        if request.family and request.family not in BY_NAME:
            raise InvalidArgumentError(f"family: {request.family!r} is not one of {sorted(BY_NAME)}")
        if request.family and request.family != self.repository.family:
            return models_pb2.ListModelsResponse()
        return models_pb2.ListModelsResponse(models=self.repository.describe_all())

    async def GetModel(self, request, context):
        return models_pb2.GetModelResponse(model=self.repository.describe(request.model_name))

    async def ListModelVersions(self, request, context):
        default, pinned, versions = await self.repository.list_versions(request.model_name)
        return models_pb2.ListModelVersionsResponse(default_version=default, default_pinned=pinned, versions=versions)

    async def LoadModel(self, request, context):
        entry = await self.repository.load(request.model_name, request.model_version)
        if entry.state == State.MODEL_STATE_FAILED:
            raise FailedPreconditionError(
                f"{entry.manifest.name!r} v{entry.manifest.version} could not be loaded: {entry.reason}"
            )
        return models_pb2.LoadModelResponse(version=entry.describe())

    async def UnloadModel(self, request, context):
        await self.repository.unload(request.model_name, request.model_version)
        return models_pb2.UnloadModelResponse()

    async def SetDefaultVersion(self, request, context):
        model = await self.repository.set_default(request.model_name, request.model_version)
        return models_pb2.SetDefaultVersionResponse(model=model)

    async def SetCanary(self, request, context):
        model = await self.repository.set_canary(request.model_name, request.model_version, request.percent)
        return models_pb2.SetCanaryResponse(model=model)

    async def SetShadow(self, request, context):
        model = await self.repository.set_shadow(request.model_name, request.model_version, request.percent)
        return models_pb2.SetShadowResponse(model=model)
