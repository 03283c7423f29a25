"""API keys and tenants at the gateway.

Callers send `authorization: Bearer <key>`. Keys are never stored: the keys file (a JSON file,
or a Kubernetes Secret mounted as one) holds each key's sha256, its tenant and its roles:

    {"keys": [{"name": "billing-ci", "tenant": "billing", "sha256": "<64 hex>", "roles": ["admin"]}]}

Roles: `admin` may manage every model (load, unload, set the default, the Open Inference
repository rpcs) and train into public model names. Without it a tenant manages and trains only
its own private models, and everything else it does is scoped to its tenant. With API keys off,
the one caller is an admin of the one tenant ("").

The file is read again when it changes (checked at most once a second), so a key is revoked by
removing it, with no restart. `python -m gateway.auth new-key --tenant billing --name billing-ci
--file keys.json [--admin]` makes a key, prints it once and appends its hash. Health checks and
reflection need no key.
"""

from __future__ import annotations

import argparse
import contextvars
import hashlib
import hmac
import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared.errors import PermissionDeniedError, UnauthenticatedError
from shared.handler_wrapping import MethodInterceptor, wrap_handler
from shared.observability import call_metadata

ADMIN = "admin"
ROLES = frozenset({ADMIN})


@dataclass(frozen=True)
class Principal:
    """Who the call being served runs as."""

    tenant: str
    roles: frozenset[str] = frozenset()

    @property
    def admin(self) -> bool:
        return ADMIN in self.roles


log = logging.getLogger(__name__)

# With API keys off there is one caller: an admin of the one tenant, "".
UNAUTHENTICATED_ADMIN = Principal("", frozenset({ADMIN}))
CURRENT_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "maas_principal", default=UNAUTHENTICATED_ADMIN
)
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                "/grpc.reflection.v1.ServerReflection/")  # fmt: skip


def current_principal() -> Principal:
    return CURRENT_PRINCIPAL.get()


def current_tenant() -> str:
    return CURRENT_PRINCIPAL.get().tenant


def require_admin(what: str) -> None:
    """PERMISSION_DENIED unless the caller has the admin role."""
    if not current_principal().admin:
        raise PermissionDeniedError(f"{what} needs an API key with the admin role")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, entries: list[dict[str, Any]]) -> None:
        for i, entry in enumerate(entries):
            if len(entry.get("sha256", "")) != 64 or not entry.get("tenant"):
                raise ValueError(f"keys[{i}]: needs a 64-hex 'sha256' and a 'tenant'")
            unknown = set(entry.get("roles", [])) - ROLES
            if unknown:
                raise ValueError(f"keys[{i}]: unknown roles {sorted(unknown)}; known: {sorted(ROLES)}")
        self.entries = entries

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        return cls(json.loads(Path(path).read_text())["keys"])

    def principal_for(self, metadata: Any) -> Principal:
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise UnauthenticatedError("missing API key: send metadata 'authorization: Bearer <key>'")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise UnauthenticatedError("malformed authorization metadata: expected 'Bearer <key>'")
        digest = hash_key(key.strip())
        found = None
        # Compare against every entry in constant time, so timing reveals nothing about the keys.
        for entry in self.entries:
            if hmac.compare_digest(digest, entry["sha256"]):
                found = entry
        if found is None:
            raise UnauthenticatedError("unknown API key")
        return Principal(found["tenant"], frozenset(found.get("roles", [])))

    def tenant_for(self, metadata: Any) -> str:
        return self.principal_for(metadata).tenant


class KeysFile:
    """The API keys, read again when their file changes: revoking a key needs no restart.

    A file that goes missing or stops parsing keeps the keys last read (and says so once), so a
    bad edit never opens the gateway nor locks every caller out.
    """

    def __init__(self, path: Path, check_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.check_every_s = check_every_s
        self._stamp = self._file_stamp()
        self._keys = ApiKeys.from_file(self.path)
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def keys(self) -> ApiKeys:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s:
            self._checked = now
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._keys = ApiKeys.from_file(self.path)
                    log.info("API keys reloaded from %s: %d keys", self.path, len(self._keys.entries))
                except (OSError, ValueError, KeyError) as exc:
                    log.error("API keys file %s is unreadable; keeping the keys read before: %s", self.path, exc)
                self._stamp = stamp
        return self._keys


class AuthInterceptor(MethodInterceptor):
    """Refuses calls without a valid key (UNAUTHENTICATED) and runs the others as their tenant.

    Each method is wrapped once; the key is read from each call's own metadata."""

    def __init__(self, keys: ApiKeys | KeysFile) -> None:
        self.keys = keys if isinstance(keys, KeysFile) else None
        self._fixed = keys if isinstance(keys, ApiKeys) else None

    def principal_for(self, metadata: Any) -> Principal:
        return (self._fixed or self.keys.keys()).principal_for(metadata)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith(OPEN_METHODS):
            return handler
        principal_for = self.principal_for

        async def enter(context) -> contextvars.Token:
            try:
                principal = principal_for(call_metadata(context))
            except UnauthenticatedError as exc:
                await context.abort(exc.code, exc.message)
            return CURRENT_PRINCIPAL.set(principal)

        def unary(behavior):
            async def wrapped(request, context):
                token = await enter(context)
                try:
                    return await behavior(request, context)
                finally:
                    CURRENT_PRINCIPAL.reset(token)

            return wrapped

        def streaming(behavior):
            async def wrapped(request, context):
                token = await enter(context)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    CURRENT_PRINCIPAL.reset(token)

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
    new.add_argument("--admin", action="store_true", help="give the key the admin role")
    args = parser.parse_args()
    key = f"maas_{secrets.token_urlsafe(32)}"
    data = json.loads(args.file.read_text()) if args.file.exists() else {"keys": []}
    roles = [ADMIN] if args.admin else []
    data["keys"].append({"name": args.name, "tenant": args.tenant, "sha256": hash_key(key), "roles": roles})
    args.file.write_text(json.dumps(data, indent=2) + "\n")
    print(key)
    print(f"stored its sha256 for tenant {args.tenant!r} in {args.file}; the key itself is not kept", file=sys.stderr)


if __name__ == "__main__":
    main()
