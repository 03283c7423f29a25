"""The model rpcs every family service shares: ListModels, GetModel and the admin rpcs.

Each family's proto package declares its own request and response messages with the same
fields; `pb2` is that package's generated module.
"""

from __future__ import annotations

from types import ModuleType

from shared.errors import FailedPreconditionError
from shared.model_repository import ModelRepository, State


class ModelAdminServicer:
    def __init__(self, pb2: ModuleType, repository: ModelRepository) -> None:
        self.pb2 = pb2
        self.repository = repository

    async def ListModels(self, request, context):
        return self.pb2.ListModelsResponse(models=self.repository.describe_all())

    async def GetModel(self, request, context):
        return self.pb2.GetModelResponse(model=self.repository.describe(request.model_name))

    async def ListModelVersions(self, request, context):
        default, pinned, versions = self.repository.list_versions(request.model_name)
        return self.pb2.ListModelVersionsResponse(default_version=default, default_pinned=pinned, versions=versions)

    async def LoadModel(self, request, context):
        entry = await self.repository.load(request.model_name, request.model_version)
        if entry.state == State.MODEL_STATE_FAILED:
            raise FailedPreconditionError(
                f"{entry.manifest.name!r} v{entry.manifest.version} could not be loaded: {entry.reason}"
            )
        return self.pb2.LoadModelResponse(version=entry.describe())

    async def UnloadModel(self, request, context):
        await self.repository.unload(request.model_name, request.model_version)
        return self.pb2.UnloadModelResponse()

    async def SetDefaultVersion(self, request, context):
        model = await self.repository.set_default(request.model_name, request.model_version)
        return self.pb2.SetDefaultVersionResponse(model=model)
