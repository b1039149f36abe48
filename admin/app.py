"""The admin app factory: :func:`create_app` builds a Quart-Trio app over one :class:`~admin.state.AdminState`.

Adding a group of routes is one line in :data:`ROUTE_MODULES`: a module exposing ``bp`` (a Blueprint whose routes
each carry ``@requires(...)``; :func:`admin.rbac.check_routes` refuses the app otherwise).

Cross-cutting behaviour set here:

* bodies over 1 MiB answer 413; JSON is parsed by orjson (nesting capped at 1024 levels, no NaN), so a deeply
  nested body is a clean 400, not a RecursionError;
* every error is JSON (:mod:`admin.errors`);
* the OpenAPI document is at ``/api/openapi.json`` and an interactive page at ``/api/docs``;
* CORS is off unless ``admin_cors_origins`` lists origins: then exactly those origins are echoed (with
  ``Vary: Origin``), never ``*`` and never with credentials (the API uses bearer tokens, not cookies);
* every response carries ``X-Request-Id``, ``Cache-Control: no-store`` (tokens and keys must not be cached) and
  ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import importlib
import re
import uuid
from typing import Any, cast

import orjson
import pydantic_core
from quart import Response, g, request
from quart.json.provider import DefaultJSONProvider
from quart_schema import Info, OpenAPIProvider, PydanticDumpOptions, QuartSchema
from quart_trio import QuartTrio
from werkzeug.routing import IntegerConverter, Map

import trioproxy
from admin.errors import register_error_handlers
from admin.rbac import check_routes
from admin.schemas import NoContent
from admin.state import EXTENSION, AdminState
from trioproxy.errors import ConfigError

ROUTE_MODULES = (
    "admin.routes.auth",
    "admin.routes.roles",
    "admin.routes.users",
    "admin.routes.providers",
    "admin.routes.provider_keys",
    "admin.routes.keys",
    "admin.routes.prices",
    "admin.routes.requests",
    "admin.routes.statistics",
    "admin.routes.audit",
    "admin.routes.operations",
    "admin.metrics",
)
MAX_BODY_BYTES = 1024 * 1024
_ORIGIN = re.compile(r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
_PREFLIGHT_METHODS = "GET, POST, PATCH, DELETE"
_PREFLIGHT_HEADERS = "Authorization, Content-Type"


class IdConverter(IntegerConverter):
    """Object ids in paths: any integer routes to its view, so the caller is authenticated first; an id outside
    1 .. 2^31-1 then answers 404 there (:func:`admin.rbac.requires`), before it reaches the database."""

    def __init__(self, map: Map) -> None:
        super().__init__(map, signed=True)


class _JSONProvider(DefaultJSONProvider):
    sort_keys = False

    @staticmethod
    def default(o: Any) -> Any:
        return pydantic_core.to_jsonable_python(o)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        # orjson refuses NaN/Infinity and nesting deeper than 1024; JSONDecodeError is a ValueError: 400.
        return orjson.loads(s)


class _OpenAPI(OpenAPIProvider):
    def build_request_body(self, model: Any, source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body, definitions = super().build_request_body(model, source)
        body["required"] = True  # every route with a body schema refuses a missing body (422)
        return body, definitions

    def build_response_object(self, model: Any, headers_model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if model is NoContent:
            return {"description": "No Content"}, {}
        if (ready := getattr(model, "openapi_response", None)) is not None:
            return dict(ready), {}  # a non-JSON answer documents itself (admin.metrics.PrometheusText)
        return super().build_response_object(model, headers_model)


def parse_cors_origins(raw: str) -> frozenset[str]:
    """``scheme://host[:port]`` origins, comma-separated; ``*``, ``null`` and anything with a path are refused."""
    origins = set()
    for item in raw.split(","):
        origin = item.strip().lower().rstrip("/")
        if not origin:
            continue
        if not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"admin_cors_origins: {origin!r} is not an origin like https://admin.example.com"
            )
        origins.add(origin)
    return frozenset(origins)


def create_app(state: AdminState) -> QuartTrio:
    app = QuartTrio("trioproxy.admin")
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        BODY_TIMEOUT=30,
        RESPONSE_TIMEOUT=120,
        PROPAGATE_EXCEPTIONS=False,
    )
    app.extensions[EXTENSION] = state
    app.url_map.converters["id"] = IdConverter
    QuartSchema(
        app,
        openapi_path="/api/openapi.json",
        swagger_ui_path="/api/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        info=Info(title="trioproxy admin API", version=trioproxy.__version__),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        security=[{"bearer": []}],
        pydantic_dump_options=cast(PydanticDumpOptions, {"mode": "json"}),
        openapi_provider_class=_OpenAPI,
    )
    app.json = _JSONProvider(app)
    for module in ROUTE_MODULES:
        app.register_blueprint(importlib.import_module(module).bp)
    check_routes(app)
    register_error_handlers(app)
    _install_headers(app, parse_cors_origins(state.settings.admin_cors_origins))
    return app


def _install_headers(app: QuartTrio, cors_origins: frozenset[str]) -> None:
    @app.before_request
    async def _request_id_and_body() -> None:
        g.request_id = uuid.uuid4().hex
        # Read the whole body (at most MAX_CONTENT_LENGTH, else 413) before any answer, even a 404 or 405:
        # hypercorn closes a keep-alive connection answered before its request body was read, and a client
        # that already reused it waits for nothing.
        await request.get_data(cache=True)

    @app.after_request
    async def _headers(response: Response) -> Response:
        headers = response.headers
        if cors_origins:
            response.vary.add("Origin")
            origin = (request.headers.get("Origin") or "").lower()
            if origin in cors_origins:
                headers["Access-Control-Allow-Origin"] = origin
                headers["Access-Control-Expose-Headers"] = "Retry-After, X-Request-Id"
                if request.method == "OPTIONS":
                    headers["Access-Control-Allow-Methods"] = _PREFLIGHT_METHODS
                    headers["Access-Control-Allow-Headers"] = _PREFLIGHT_HEADERS
                    headers["Access-Control-Max-Age"] = "600"
        headers["X-Request-Id"] = g.get("request_id") or uuid.uuid4().hex
        headers.setdefault("Cache-Control", "no-store")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        return response
