"""Every error of the admin API as JSON ``{"error": {"code", "message"}}`` with the right status, never a traceback.

Mapping:

* :class:`ApiError` (raised by the admin plane itself: 401 with ``WWW-Authenticate: Bearer``, 403, 429 with
  ``Retry-After``) keeps its status and code;
* the service layer's errors map by class: ``ValidationError`` 422, ``NotFoundError`` 404, ``ForbiddenError`` 403,
  ``ConflictError`` 409; any other :class:`~trioproxy.errors.TrioProxyError` is a 500 whose message is logged, not
  shown;
* schema validation (quart-schema) is 422, listing each field's location and pydantic's message, never the value
  it refused (it may be a password);
* werkzeug's HTTP errors keep their status with a code from their name (400 malformed JSON, 404, 405,
  413 over the body limit);
* a database that cannot be reached is 503; anything else is 500 ``internal`` (the exception goes to the log).

:data:`DOCUMENTED_ERRORS` lists the error statuses every route documents in the OpenAPI schema.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sqlalchemy as sa
from quart import Response, jsonify
from quart_schema import RequestSchemaValidationError, ResponseSchemaValidationError
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy.errors import ConflictError, ForbiddenError, NotFoundError, TrioProxyError, ValidationError

logger = logging.getLogger("admin")

DOCUMENTED_ERRORS = (400, 401, 403, 404, 409, 413, 422, 429, 503)
_MAX_FIELD_ERRORS = 10
_NON_WORD = re.compile(r"[^a-z0-9]+")


class ApiError(Exception):
    """An error answered as is: ``status``, a stable machine-readable ``code`` and a human ``message``."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unauthorized(message: str = "invalid or expired token") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="trioproxy"'})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def too_many_requests(retry_after: float) -> ApiError:
    seconds = max(1, int(retry_after + 0.999))
    return ApiError(
        429,
        "too_many_requests",
        f"too many attempts; try again in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


_SERVICE_ERRORS: tuple[tuple[type[TrioProxyError], int, str], ...] = (
    (ValidationError, 422, "validation_error"),
    (NotFoundError, 404, "not_found"),
    (ForbiddenError, 403, "forbidden"),
    (ConflictError, 409, "conflict"),
)


def _schema_message(error: Exception) -> str:
    inner = getattr(error, "validation_error", None)
    errors_of = getattr(inner, "errors", None)
    if not callable(errors_of):
        return "the request does not match the schema"
    parts = []
    for item in errors_of(include_input=False, include_url=False, include_context=False)[:_MAX_FIELD_ERRORS]:
        location = ".".join(str(part) for part in item.get("loc", ()))
        if item.get("type") == "model_type" and not location:
            parts.append("the body must be a JSON object")
        else:
            parts.append(f"{location or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request does not match the schema"


def register_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.errorhandler(RequestSchemaValidationError)
    async def _schema_error(error: RequestSchemaValidationError) -> Response:
        return error_response(422, "validation_error", _schema_message(error))

    @app.errorhandler(ResponseSchemaValidationError)
    async def _response_schema_error(error: ResponseSchemaValidationError) -> Response:
        logger.error("a response did not match its schema: %s", type(error.validation_error).__name__)
        return error_response(500, "internal", "internal error")

    @app.errorhandler(TrioProxyError)
    async def _service_error(error: TrioProxyError) -> Response:
        for cls, status, code in _SERVICE_ERRORS:
            if isinstance(error, cls):
                return error_response(status, code, error.message)
        logger.error("service error %s: %s", type(error).__name__, error.message)
        return error_response(500, "internal", "internal error")

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _NON_WORD.sub("_", (error.name or "error").lower()).strip("_")
        headers: dict[str, Any] = {}
        if status == 413:
            message = "the request body is larger than the 1 MiB limit"
            # The rest of the body is never read: the client must not send another request on this connection.
            headers["Connection"] = "close"
        elif status == 400:
            message = "the request is malformed (is the body valid JSON?)"
        else:
            message = error.description or error.name or "error"
        if status == 405 and error.get_headers():
            headers = {name: value for name, value in error.get_headers() if name.lower() == "allow"}
        return error_response(status, code or "error", message, headers)

    @app.errorhandler(UnicodeDecodeError)
    async def _not_utf8(error: UnicodeDecodeError) -> Response:
        return error_response(400, "bad_request", "the request body is not UTF-8")

    @app.errorhandler(sa.exc.OperationalError)
    async def _database_down(error: sa.exc.OperationalError) -> Response:
        logger.error("database unavailable: %s", type(error.orig).__name__ if error.orig else "unknown")
        return error_response(503, "unavailable", "the database is unavailable", {"Retry-After": "5"})

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        logger.exception("unhandled error in the admin API", exc_info=error)
        return error_response(500, "internal", "internal error")
