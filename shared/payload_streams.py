"""Where payload records live (gateway/payloads.py writes them; drift checks in the model services
read them): one Redis Stream per tenant and model, each record sealed to its stream when encryption
is on."""

from __future__ import annotations


def stream_key(tenant: str, model: str) -> str:
    return f"maas:v1:payloads:{tenant or '-'}:{model}"


def streams_of(model: str) -> str:
    """A SCAN pattern for every tenant's records of `model`."""
    return f"maas:v1:payloads:*:{model}"


def sealing_context(key: str | bytes) -> bytes:
    """What a sealed payload record is bound to: its stream, so it cannot pass for another tenant's."""
    return b"maas-payload:" + (key if isinstance(key, bytes) else key.encode())
