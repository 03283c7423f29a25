"""The catalog remembers a model's owner per model message it read, and reads a new message anew."""

from __future__ import annotations

from gateway.catalog import ModelCatalog
from maas.common.v1 import model_pb2


def _model(name: str, owner: str) -> model_pb2.Model:
    model = model_pb2.Model(name=name)
    model.versions.add(version=1, owner=owner)
    return model


def test_an_owner_is_read_again_when_the_catalog_holds_a_new_message_for_the_model() -> None:
    catalog = ModelCatalog({}, refresh_s=60.0)
    public = _model("m", "")
    assert catalog.owner(public) == "" and catalog.visible(public, "tenant-b")
    private = _model("m", "tenant-a")  # the same name, now another tenant's (a refresh replaced the message)
    assert catalog.owner(private) == "tenant-a"
    assert not catalog.visible(private, "tenant-b") and catalog.visible(private, "tenant-a")
    assert catalog.owner(public) == ""  # each message keeps its own answer
