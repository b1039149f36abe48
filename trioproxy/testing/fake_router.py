"""The fake upstream's router (pure, no I/O): which provider a request speaks, which key it presents, which route
it asks for, and the :class:`~trioproxy.testing.fake_payloads.Reply` that route answers with.

The server in :mod:`trioproxy.testing.fake_upstream` parses the bytes, applies faults and paces the reply; the
wire formats themselves are built in :mod:`~trioproxy.testing.fake_openai`, :mod:`~trioproxy.testing.fake_anthropic`
and :mod:`~trioproxy.testing.fake_gemini`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from trioproxy.testing import fake_anthropic, fake_gemini, fake_openai
from trioproxy.testing.fake_payloads import (
    Call,
    Dialect,
    Reply,
    error_reply,
)


@dataclass
class CapturedRequest:
    """One request as received: header names lower-cased and in order, the whole body, and the trio time
    (``trio.current_time()``, so MockClock tests see virtual time) at which its head arrived."""

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # "openai.chat", "gemini.generate", ...
    model: str | None = None  # Gemini names the model in the path


_GEMINI_ACTIONS = {
    "generateContent": "gemini.generate",
    "streamGenerateContent": "gemini.stream",
    "countTokens": "gemini.count_tokens",
    "embedContent": "gemini.embed",
    "batchEmbedContents": "gemini.batch_embed",
}
_ANTHROPIC_POSTS = {
    "/v1/messages": "anthropic.messages",
    "/v1/messages/count_tokens": "anthropic.count_tokens",
}
_OPENAI_POSTS = {
    "/v1/chat/completions": "openai.chat",
    "/v1/completions": "openai.completions",
    "/v1/embeddings": "openai.embeddings",
    "/v1/responses": "openai.responses",
}


def header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _gemini_rest(path: str) -> str | None:
    """The part after the API version for a Gemini path (``models/x:generateContent``), else None."""
    for prefix in ("/v1beta/", "/v1/"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return None


def dialect_of(path: str, headers: dict[str, str], params: dict[str, list[str]]) -> Dialect:
    if path.startswith("/v1beta/"):
        return Dialect.GEMINI
    if path.startswith("/v1/models/") and ":" in path.rpartition("/")[2]:
        return Dialect.GEMINI
    if path.startswith("/v1/messages"):
        return Dialect.ANTHROPIC
    if "x-goog-api-key" in headers or "key" in params:
        return Dialect.GEMINI
    if "x-api-key" in headers or "anthropic-version" in headers:
        return Dialect.ANTHROPIC
    return Dialect.OPENAI


def presented_key(dialect: Dialect, headers: dict[str, str], params: dict[str, list[str]]) -> str | None:
    bearer = None
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
    if dialect is Dialect.OPENAI:
        return bearer
    if dialect is Dialect.ANTHROPIC:
        # x-api-key is the documented header; the anthropic SDK (2.x) sends its api_key as a Bearer token,
        # which the API accepts too.
        return headers.get("x-api-key", bearer)
    key = headers.get("x-goog-api-key")
    if key is None and params.get("key"):
        key = params["key"][0]
    return key


def route_of(dialect: Dialect, method: str, path: str) -> Route | None:
    if dialect is Dialect.GEMINI:
        rest = _gemini_rest(path)
        if rest is None:
            return None
        if rest == "models":
            return Route("gemini.models") if method == "GET" else None
        if not rest.startswith("models/") or len(rest) == len("models/"):
            return None
        name, colon, action = rest[len("models/") :].partition(":")
        if not colon:
            return Route("gemini.models", name) if method == "GET" and "/" not in name else None
        kind = _GEMINI_ACTIONS.get(action)
        return Route(kind, name) if kind is not None and method == "POST" and name else None
    if path == "/v1/models" or path.startswith("/v1/models/"):
        model = path[len("/v1/models/") :] or None
        if method != "GET" or (model is not None and "/" in model):
            return None
        return Route(f"{dialect.value}.models", model)
    if method != "POST":
        return None
    if dialect is Dialect.ANTHROPIC:
        kind = _ANTHROPIC_POSTS.get(path)
        return Route(kind) if kind is not None else None
    kind = _OPENAI_POSTS.get(path)
    return Route(kind) if kind is not None else None


_BAD_JSON = {
    Dialect.OPENAI: "We could not parse the JSON body of your request. The API expects a JSON payload.",
    Dialect.ANTHROPIC: "There was an error parsing the body of your request",
    Dialect.GEMINI: "Invalid JSON payload received.",
}


def build_reply(
    dialect: Dialect, route: Route, request: CapturedRequest, params: dict[str, list[str]], call: Call
) -> Reply:
    """The route's reply; a body that is not a JSON object, or lacks a model, gets the provider's 400."""
    kind = route.kind
    if kind.endswith(".models"):
        if dialect is Dialect.OPENAI:
            return fake_openai.openai_models(route.model)
        if dialect is Dialect.ANTHROPIC:
            return fake_anthropic.anthropic_models(route.model)
        return fake_gemini.gemini_models(route.model)
    try:
        body = json.loads(request.body) if request.body else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return error_reply(dialect, 400, _BAD_JSON[dialect], seq=call.seq)
    if dialect is Dialect.GEMINI:
        gemini_model = route.model or ""
        if kind == "gemini.generate":
            return fake_gemini.gemini_generate(call, gemini_model, stream=False, sse=False)
        if kind == "gemini.stream":
            return fake_gemini.gemini_generate(
                call, gemini_model, stream=True, sse=params.get("alt") == ["sse"]
            )
        if kind == "gemini.count_tokens":
            return fake_gemini.gemini_count_tokens(call)
        return fake_gemini.gemini_embed(body, batch=kind == "gemini.batch_embed")
    model = body.get("model")
    if kind == "anthropic.count_tokens":
        return fake_anthropic.anthropic_count_tokens(call)
    if not isinstance(model, str) or not model:
        message = (
            "model: Field required" if dialect is Dialect.ANTHROPIC else "you must provide a model parameter"
        )
        return error_reply(dialect, 400, message, seq=call.seq)
    builder = {
        "anthropic.messages": fake_anthropic.anthropic_messages,
        "openai.chat": fake_openai.openai_chat,
        "openai.completions": fake_openai.openai_completions,
        "openai.embeddings": fake_openai.openai_embeddings,
        "openai.responses": fake_openai.openai_responses,
    }[kind]
    return builder(call, body, model)
