"""A ModelService for the small backends the gateway tests stand up: it lists the models the backend
answers for, as a real family service does, since the gateway refuses a model its catalog has not read."""

from __future__ import annotations

import grpc

from maas.common.v1 import model_pb2
from maas.models.v1 import models_pb2, models_pb2_grpc

SERVICE_NAME = "maas.models.v1.ModelService"


class ListedModels(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, family: str, *names: str) -> None:
        self.family = family
        self.names = names

    async def ListModels(self, request, context):
        # As a real service: a read for another family's models finds none here. Tests that point every
        # family's backend at this one server then resolve each name to one family, not to whichever read won.
        if request.family and request.family != self.family:
            return models_pb2.ListModelsResponse()
        return models_pb2.ListModelsResponse(models=[self.model(name) for name in self.names])

    def model(self, name: str) -> model_pb2.Model:
        version = model_pb2.ModelVersion(name=name, version=1, family=self.family, state=model_pb2.MODEL_STATE_READY)
        return model_pb2.Model(name=name, default_version=1, versions=[version])


def add_listed_models(server: grpc.aio.Server, family: str, *names: str) -> None:
    models_pb2_grpc.add_ModelServiceServicer_to_server(ListedModels(family, *names), server)
