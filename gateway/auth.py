"""API keys and tenants at the gateway.

Callers send `authorization: Bearer <key>`. Keys are never stored: the keys file (a JSON file,
or a Kubernetes Secret mounted as one) holds each key's sha256 and its tenant:

    {"keys": [{"name": "billing-ci", "tenant": "billing", "sha256": "<64 hex>"}]}

`python -m gateway.auth new-key --tenant billing --name billing-ci --file keys.json` makes a
key, prints it once and appends its hash. Health checks and reflection need no key.
"""

from __future__ import annotations

import argparse
import contextvars
import hashlib
import hmac
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from shared.errors import UnauthenticatedError
from shared.handler_wrapping import wrap_handler

# The tenant of the call being served; "" when API keys are off (one tenant).
CURRENT_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("maas_tenant", default="")
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                "/grpc.reflection.v1.ServerReflection/")  # fmt: skip


def current_tenant() -> str:
    return CURRENT_TENANT.get()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, entries: list[dict[str, str]]) -> None:
        for i, entry in enumerate(entries):
            if len(entry.get("sha256", "")) != 64 or not entry.get("tenant"):
                raise ValueError(f"keys[{i}]: needs a 64-hex 'sha256' and a 'tenant'")
        self.entries = entries

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        return cls(json.loads(Path(path).read_text())["keys"])

    def tenant_for(self, metadata: Any) -> str:
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise UnauthenticatedError("missing API key: send metadata 'authorization: Bearer <key>'")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise UnauthenticatedError("malformed authorization metadata: expected 'Bearer <key>'")
        digest = hash_key(key.strip())
        tenant = None
        # Compare against every entry in constant time, so timing reveals nothing about the keys.
        for entry in self.entries:
            if hmac.compare_digest(digest, entry["sha256"]):
                tenant = entry["tenant"]
        if tenant is None:
            raise UnauthenticatedError("unknown API key")
        return tenant


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key (UNAUTHENTICATED) and runs the others as their tenant."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        try:
            tenant, refusal = self.keys.tenant_for(details.invocation_metadata), None
        except UnauthenticatedError as exc:
            tenant, refusal = "", exc
        return _as_tenant(handler, tenant, refusal)


def _as_tenant(handler: grpc.RpcMethodHandler, tenant: str, refusal: UnauthenticatedError | None):
    def unary(behavior):
        async def wrapped(request, context):
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            token = CURRENT_TENANT.set(tenant)
            try:
                return await behavior(request, context)
            finally:
                CURRENT_TENANT.reset(token)

        return wrapped

    def streaming(behavior):
        async def wrapped(request, context):
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            token = CURRENT_TENANT.set(tenant)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                CURRENT_TENANT.reset(token)

        return wrapped

    return wrap_handler(handler, unary, streaming)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS from PEM files; with a client CA, clients must present a certificate it signed."""
    chain = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(chain)
    return grpc.ssl_server_credentials(chain, root_certificates=Path(client_ca).read_bytes(),
                                       require_client_auth=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="Manage the gateway's API keys file.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-key", help="make a key, print it once, store only its sha256")
    new.add_argument("--tenant", required=True)
    new.add_argument("--name", default="")
    new.add_argument("--file", type=Path, required=True)
    args = parser.parse_args()
    key = f"maas_{secrets.token_urlsafe(32)}"
    data = json.loads(args.file.read_text()) if args.file.exists() else {"keys": []}
    data["keys"].append({"name": args.name, "tenant": args.tenant, "sha256": hash_key(key)})
    args.file.write_text(json.dumps(data, indent=2) + "\n")
    print(key)
    print(f"stored its sha256 for tenant {args.tenant!r} in {args.file}; the key itself is not kept", file=sys.stderr)


if __name__ == "__main__":
    main()
