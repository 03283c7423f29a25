"""The ASGI app of the HTTP front: its routes, and what every request goes through first.

Each request gets a request id (the caller's `x-request-id`, or a new one, returned in the response
and passed to the backends), waits for the gateway's start-up like a gRPC call does, then, except for
health, the OpenAPI document and the console's static page, needs an API key (`Authorization: Bearer
<key>`, the gRPC keys file) and passes the tenant's rate limit. The handlers then run as that
principal, through the gateway's own objects. Errors come back in the shape of the API they concern:
`{"error": "..."}` for KServe v2 and the console, OpenAI's error object under /v1.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from gateway.auth import CURRENT_PRINCIPAL, UNAUTHENTICATED_ADMIN, KeysFile, Principal
from gateway.catalog import ModelCatalog
from gateway.http import console, explain, kserve, openai_compat
from gateway.http.context import INTERNAL_MESSAGE, http_status
from gateway.http.metrics import observe, route_template
from gateway.model_service import GatewayModelService
from gateway.open_inference import SERVER_VERSION, OpenInferenceServicer
from gateway.proxy import GatewayProxy
from gateway.rate_limit import RETRY_AFTER_KEY, RateLimiter
from gateway.settings import GatewaySettings
from gateway.training import TrainingServicer
from shared.errors import MaasError, UnauthenticatedError
from shared.jobs import JobStore
from shared.observability import REQUEST_ID, REQUEST_ID_KEY

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/openapi.json", "/console", "/console/"})
OPEN_PREFIXES = ("/console/static/", "/console/jobs/")
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


@dataclass
class HttpFront:
    """What the HTTP handlers call: the gateway's own objects, shared with its gRPC servicers."""

    settings: GatewaySettings
    proxy: GatewayProxy
    catalog: ModelCatalog
    models: GatewayModelService
    inference: OpenInferenceServicer
    training: TrainingServicer | None = None
    jobs: JobStore | None = None
    keys: KeysFile | None = None
    limiter: RateLimiter | None = None
    is_open: Callable[[], bool] = lambda: True
    closing: asyncio.Event = field(default_factory=asyncio.Event)


# --- errors -------------------------------------------------------------------------------------------

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
                429: "rate_limit_error"}  # fmt: skip
OPENAI_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded", 504: "timeout"}


def error_response(
    path: str, status: int, message: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:  # fmt: skip
    """The error in the shape of the API the path belongs to."""
    if path.startswith("/v1/") or path == "/v1":
        kind = OPENAI_TYPES.get(status, "server_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param,
                                          "code": code or OPENAI_CODES.get(status)}}  # fmt: skip
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


async def _maas_error(request, exc: MaasError) -> JSONResponse:
    return error_response(request.url.path, http_status(exc), exc.message, getattr(exc, "param", None),
                          getattr(exc, "error_code", None))  # fmt: skip


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    where = loc[1:] if loc and loc[0] in ("query", "path", "header") else loc
    param = where[0] if where else None  # the top-level field, as OpenAI's `param` names it
    problem = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "model_attributes_type" and not loc:
        problem = "the request body must be a JSON object (send Content-Type: application/json)"
    message = f"{param}: {problem}" if param else problem
    return error_response(request.url.path, 400, message, param)


async def _http_error(request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path!r}; see /openapi.json"}.get(exc.status_code, str(exc.detail))
    return error_response(request.url.path, exc.status_code, message, headers=getattr(exc, "headers", None))


# --- what every request goes through ------------------------------------------------------------------


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class FrontMiddleware:
    """Request id, start-up gate, API key, rate limit and metrics, for every HTTP request."""

    def __init__(self, app, front: HttpFront) -> None:
        self.app = app
        self.front = front

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        path = scope["path"]
        request_id = (headers.get(REQUEST_ID_KEY) or "")[:128] or uuid.uuid4().hex
        id_token = REQUEST_ID.set(request_id)
        status = 500
        response_started = False

        async def send_with_id(message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_KEY.encode(), request_id.encode())]}  # fmt: skip
            await send(message)

        try:
            refusal, principal = await self._admit(path, headers)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            token = CURRENT_PRINCIPAL.set(principal)
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                CURRENT_PRINCIPAL.reset(token)
        except Exception:  # noqa: BLE001 - the one place that answers every unexpected failure
            log.exception("unhandled error serving %s %s", scope.get("method"), path)
            if not response_started:
                await error_response(path, 500, INTERNAL_MESSAGE)(scope, receive, send_with_id)
        finally:
            observe(route_template(scope), scope.get("method", ""), status, time.perf_counter() - started)
            REQUEST_ID.reset(id_token)

    async def _admit(self, path: str, headers: Headers) -> tuple[JSONResponse | None, Principal]:
        """(an error response, or None to go on; the principal the request runs as)."""
        front = self.front
        if path in HEALTH_PATHS:
            return None, UNAUTHENTICATED_ADMIN if front.keys is None else Principal("")
        if not front.is_open():
            return error_response(path, 503, "the gateway is starting; retry shortly"), Principal("")
        if _is_open(path):
            return None, UNAUTHENTICATED_ADMIN if front.keys is None else Principal("")
        if front.keys is None:
            principal = UNAUTHENTICATED_ADMIN
        else:
            authorization = headers.get("authorization")
            try:
                principal = front.keys.keys().principal_for([("authorization", authorization)] if authorization else [])
            except UnauthenticatedError as exc:
                message = exc.message.replace("metadata", "header")
                return error_response(path, 401, message, headers={"www-authenticate": "Bearer"}), Principal("")
        if front.limiter is not None:
            wait_ms, rate = await front.limiter.wait_ms(principal.tenant)
            if wait_ms:
                message = (f"rate limit of {rate:g} requests/s for tenant {principal.tenant or 'default'!r} reached; "
                           f"retry after {wait_ms} ms")  # fmt: skip
                retry = {"retry-after": str(math.ceil(wait_ms / 1000)), RETRY_AFTER_KEY: str(wait_ms)}
                return error_response(path, 429, message, headers=retry), principal
        return None, principal


# --- the app ----------------------------------------------------------------------------------------------

DESCRIPTION = """maas over HTTP, beside its gRPC API, with the same API keys, tenants, roles, rate limits,
cache and deadlines.

* **KServe v2 REST** (the Open Inference Protocol), with Triton's binary tensor extension: `tritonclient.http`
  works unchanged.
* **Explanations**, in the same style: `POST /v2/models/{name}/explain` takes `/infer`'s body.
* **OpenAI-compatible embeddings**: `POST /v1/embeddings`, `GET /v1/models`.
* **The console's API** under `/console/api`; the console itself is at `/console`.

Send `Authorization: Bearer <key>` when the gateway has API keys. `x-request-timeout` (seconds) sets a
call's deadline; `cache-control: no-cache` skips the cache read, `no-store` the cache; the `maas-cache`
response header says what the cache did.
"""


def create_app(front: HttpFront) -> FastAPI:
    app = FastAPI(
        title="maas HTTP API", version=SERVER_VERSION, description=DESCRIPTION,
        docs_url=None, redoc_url=None, openapi_url="/openapi.json",
    )  # fmt: skip
    app.state.front = front
    app.include_router(kserve.router)
    app.include_router(explain.router)
    app.include_router(openai_compat.router)
    app.include_router(console.router)
    app.mount("/console/static", StaticFiles(directory=console.STATIC), name="console-static")
    app.add_exception_handler(MaasError, _maas_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(FrontMiddleware, front=front)
    app.openapi = lambda: openapi_document(app)
    return app


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document, with the schemas only the raw infer body names, the security scheme, and
    the 400 this API answers where FastAPI would say 422."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in kserve.SCHEMAS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    scheme = {"type": "http", "scheme": "bearer", "description": "A maas API key, when the gateway has keys"}
    components["securitySchemes"] = {"apiKey": scheme}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if not _is_open(path):  # a key when the gateway has keys: optional in the document
                operation["security"] = [{"apiKey": []}, {}]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    app.openapi_schema = document
    return document
