"""The route allowlist: the only provider paths a pooled key can reach through the gateway.

A pooled provider key can do far more than generate text: upload files, start fine-tunes and batches, manage
the organisation. A gateway that forwards any path lets every gateway-key holder spend and read through all of
that (the reliability plan's "path allowlist"). So a request is matched against a short table of inference
routes and the upstream target is *rebuilt* from the match: the provider never sees the client's path or query
string, only the canonical path of the route and the few query parameters that route needs (``alt=sse``,
pagination). Above all, a Gemini ``?key=`` never travels upstream.

The client path is checked before matching, and tricks are answered 400 rather than normalised: dot segments,
percent-encoded dots, slashes and backslashes, empty segments, backslashes, control bytes and non-ASCII, and
absolute-form, authority-form or ``*`` targets. The one percent-escape accepted is ``%3A`` for the ``:`` of a
Gemini action, which some HTTP clients encode. Unknown paths are 404, known paths with the wrong method 405.

Gemini model paths are matched as google-genai builds them: ``/{v1beta|v1}/models/{model}:{action}`` with the
model id in plain text (``_api_client.join_url_path``, ``_transformers.t_model``). Tuned models
(``tunedModels/...``) are not served.

Pure code, no I/O; the caller decodes the request target (ASCII, or latin-1 so that non-ASCII bytes survive to
be refused here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode

from trioproxy.snapshot import ProviderKind
from trioproxy.usage import StreamFormat

_O, _A, _G = ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.GEMINI


@dataclass(frozen=True, slots=True)
class Route:
    """A matched request: everything the forwarder needs to know about it before reading the body."""

    name: str  # e.g. "openai.chat_completions", "anthropic.messages", "gemini.stream_generate_content"
    kind: ProviderKind  # provider family and client dialect
    method: str
    upstream_path: str  # without the provider's path prefix, e.g. "/v1/chat/completions"
    upstream_query: str  # "" or e.g. "alt=sse"; rebuilt from an allowlist, never contains key=
    model: str | None  # from the URL (Gemini), else None: the body tells
    stream_format: StreamFormat | None  # known from the URL; None: the body's "stream" field decides
    has_body: bool
    billable: bool  # generation and embedding routes; False for model lists and token counting


@dataclass(frozen=True, slots=True)
class RouteRejection:
    """No route: answer ``status`` with ``message`` in the ``kind`` dialect."""

    status: int
    message: str
    kind: ProviderKind


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    kind: ProviderKind
    billable: bool
    stream_format: StreamFormat | None
    query: Callable[[list[tuple[str, str]]], str]  # raises _BadQuery


class _BadQuery(Exception):
    """A kept query parameter has a value we refuse to forward."""


def _no_query(params: list[tuple[str, str]]) -> str:
    return ""


def _pick(params: list[tuple[str, str]], names: Sequence[str]) -> dict[str, str]:
    picked: dict[str, str] = {}
    for name, value in params:
        if name in names:
            if name in picked:
                raise _BadQuery(f"the query parameter {name!r} is repeated")
            picked[name] = value
    return picked


def _encode(pairs: list[tuple[str, str]]) -> str:
    return urlencode(pairs, quote_via=quote, safe="")


def _limit(value: str, name: str) -> str:
    if not value.isdigit() or len(value) > 4 or not value.isascii():
        raise _BadQuery(f"the query parameter {name!r} must be a number up to 9999")
    return value


def _opaque(value: str, name: str) -> str:
    if not value or len(value) > 1024 or not value.isascii() or not value.isprintable():
        raise _BadQuery(f"the query parameter {name!r} must be printable ASCII up to 1024 characters")
    return value


def _gemini_list_query(params: list[tuple[str, str]]) -> str:
    picked = _pick(params, ("pageSize", "pageToken"))
    pairs = []
    if "pageSize" in picked:
        pairs.append(("pageSize", _limit(picked["pageSize"], "pageSize")))
    if "pageToken" in picked:
        pairs.append(("pageToken", _opaque(picked["pageToken"], "pageToken")))
    return _encode(pairs)


def _anthropic_list_query(params: list[tuple[str, str]]) -> str:
    picked = _pick(params, ("limit", "after_id", "before_id"))
    pairs = []
    if "limit" in picked:
        pairs.append(("limit", _limit(picked["limit"], "limit")))
    for name in ("after_id", "before_id"):
        if name in picked:
            pairs.append((name, _opaque(picked[name], name)))
    return _encode(pairs)


def _gemini_json_query(params: list[tuple[str, str]]) -> str:
    alt = _pick(params, ("alt",)).get("alt")
    if alt not in (None, "json"):
        raise _BadQuery("only alt=json is supported on this Gemini method")
    return ""


def _spec(
    name: str, kind: ProviderKind, *, billable: bool, fmt: StreamFormat | None = StreamFormat.JSON
) -> _Spec:
    return _Spec(name, kind, billable, fmt, _no_query)


# path -> method -> spec. GET /v1/models is special-cased below: three dialects list models there.
_EXACT: dict[str, dict[str, _Spec]] = {
    "/v1/chat/completions": {"POST": _spec("openai.chat_completions", _O, billable=True, fmt=None)},
    "/v1/completions": {"POST": _spec("openai.completions", _O, billable=True, fmt=None)},
    "/v1/embeddings": {"POST": _spec("openai.embeddings", _O, billable=True)},
    "/v1/responses": {"POST": _spec("openai.responses", _O, billable=True, fmt=None)},
    "/v1/models": {"GET": _spec("openai.models", _O, billable=False)},
    "/v1/messages": {"POST": _spec("anthropic.messages", _A, billable=True, fmt=None)},
    "/v1/messages/count_tokens": {"POST": _spec("anthropic.count_tokens", _A, billable=False)},
    "/v1beta/models": {"GET": _Spec("gemini.models", _G, False, StreamFormat.JSON, _gemini_list_query)},
}
_ANTHROPIC_MODELS = _Spec("anthropic.models", _A, False, StreamFormat.JSON, _anthropic_list_query)
_GEMINI_V1_MODELS = _Spec("gemini.models", _G, False, StreamFormat.JSON, _gemini_list_query)

# Gemini action -> (route name, billable). All are POST.
_GEMINI_ACTIONS: dict[str, tuple[str, bool]] = {
    "generateContent": ("gemini.generate_content", True),
    "streamGenerateContent": ("gemini.stream_generate_content", True),
    "countTokens": ("gemini.count_tokens", False),
    "embedContent": ("gemini.embed_content", True),
    "batchEmbedContents": ("gemini.batch_embed_contents", True),
}
_GEMINI_VERSIONS = ("v1beta", "v1")
# Model ids are lower-case words, digits, dots and dashes ("gemini-2.5-flash", "text-embedding-004"); 128 is
# far above any real id and keeps the upstream target short.
_GEMINI_PATH = re.compile(
    rf"/(?P<version>{'|'.join(_GEMINI_VERSIONS)})/models/(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}):(?P<action>\w+)"
)
_PERCENT = re.compile(r"%(?P<hex>[0-9A-Fa-f]{2})?")
_METHOD = re.compile(r"[A-Z]{1,16}")
_MAX_ECHO = 200  # characters of a refused path quoted back in the error message


def match_route(method: str, target: str, headers: Sequence[tuple[bytes, bytes]]) -> Route | RouteRejection:
    """Match a request line against the allowlist and build the upstream path and query.

    ``target`` is the request-target as received (origin-form ``/path?query``). ``headers`` only break the tie
    on ``GET /v1/models``, which OpenAI, Anthropic (``anthropic-version`` header) and Gemini
    (``x-goog-api-key`` or ``?key=``) clients all use, and choose the dialect of a rejection.
    """
    path, _, query = target.partition("?")
    problem = _target_problem(target, path)
    if problem is not None:
        return RouteRejection(400, problem, guess_dialect(path if path.startswith("/") else "", headers))
    path = path.replace("%3A", ":").replace("%3a", ":")
    params = parse_qsl(query, keep_blank_values=True)

    methods = _EXACT.get(path)
    if methods is not None:
        if path == "/v1/models":
            return _match_models(method, path, params, headers)
        spec = methods.get(method)
        if spec is None:
            return _wrong_method(method, path, methods, headers)
        return _build(spec, method, path, params, model=None)

    gemini = _GEMINI_PATH.fullmatch(path)
    if gemini is not None and gemini["action"] in _GEMINI_ACTIONS:
        if method != "POST":
            return _wrong_method(method, path, {"POST": None}, headers)
        return _match_gemini(gemini["version"], gemini["model"], gemini["action"], params)

    echoed = path if len(path) <= _MAX_ECHO else path[:_MAX_ECHO] + "..."
    return RouteRejection(404, f"this gateway does not serve {echoed}", guess_dialect(path, headers))


def _target_problem(target: str, path: str) -> str | None:
    """Why the target is refused outright (400), or None."""
    if target == "*" or not target.startswith("/"):
        return "only origin-form request targets are accepted (no absolute-form, authority-form or '*')"
    if any(not 0x21 <= ord(char) <= 0x7E for char in target):
        return "the request target must be printable ASCII (no spaces, control bytes or non-ASCII)"
    if "#" in target:
        return "the request target must not contain a fragment"
    if "\\" in path:
        return "the request path must not contain a backslash"
    if "//" in path:
        return "the request path must not contain empty segments ('//')"
    if ".." in path or any(segment == "." for segment in path.split("/")):
        return "the request path must not contain dot segments"
    for escape in _PERCENT.finditer(path):
        if escape["hex"] is None or escape["hex"].upper() != "3A":
            return "the request path must not contain percent-encoded characters other than %3A"
    return None


def _wrong_method(
    method: str,
    path: str,
    methods: dict[str, _Spec] | dict[str, None],
    headers: Sequence[tuple[bytes, bytes]],
) -> RouteRejection:
    allowed = ", ".join(sorted(methods))
    return RouteRejection(
        405, f"{_shown(method)} is not allowed on {path}; use {allowed}", guess_dialect(path, headers)
    )


def _match_models(
    method: str, path: str, params: list[tuple[str, str]], headers: Sequence[tuple[bytes, bytes]]
) -> Route | RouteRejection:
    names = {name for name, _ in headers}
    if b"anthropic-version" in names:
        spec = _ANTHROPIC_MODELS
    elif (
        b"x-goog-api-key" in names
        or b"x-goog-api-client" in names
        or any(name == "key" for name, _ in params)
    ):
        spec = _GEMINI_V1_MODELS
    else:
        spec = _EXACT[path]["GET"]
    if method != "GET":
        return RouteRejection(405, f"{_shown(method)} is not allowed on {path}; use GET", spec.kind)
    return _build(spec, method, path, params, model=None)


def _shown(method: str) -> str:
    return method if _METHOD.fullmatch(method) else "this method"


def _match_gemini(
    version: str, model: str, action: str, params: list[tuple[str, str]]
) -> Route | RouteRejection:
    name, billable = _GEMINI_ACTIONS[action]
    upstream_path = f"/{version}/models/{model}:{action}"
    if action == "streamGenerateContent":
        try:
            alt = _pick(params, ("alt",)).get("alt")
        except _BadQuery as exc:
            return RouteRejection(400, str(exc), _G)
        if alt == "sse":
            fmt, query = StreamFormat.SSE, "alt=sse"
        elif alt in (None, "json"):
            fmt, query = StreamFormat.JSON_ARRAY, ""
        else:
            return RouteRejection(400, "streamGenerateContent supports alt=sse or alt=json only", _G)
        return Route(name, _G, "POST", upstream_path, query, model, fmt, has_body=True, billable=billable)
    spec = _Spec(name, _G, billable, StreamFormat.JSON, _gemini_json_query)
    return _build(spec, "POST", upstream_path, params, model=model)


def _build(
    spec: _Spec,
    method: str,
    upstream_path: str,
    params: list[tuple[str, str]],
    *,
    model: str | None,
) -> Route | RouteRejection:
    try:
        query = spec.query(params)
    except _BadQuery as exc:
        return RouteRejection(400, str(exc), spec.kind)
    return Route(
        name=spec.name,
        kind=spec.kind,
        method=method,
        upstream_path=upstream_path,
        upstream_query=query,
        model=model,
        stream_format=spec.stream_format,
        has_body=method == "POST",
        billable=spec.billable,
    )


def guess_dialect(path: str, headers: Sequence[tuple[bytes, bytes]]) -> ProviderKind:
    """The API dialect to answer an unmatched request in, from its path first and its headers second.

    ``/v1beta/...`` or a ``:action`` path is Gemini, ``/v1/messages...`` is Anthropic; then an
    ``x-goog-api-key`` header says Gemini and ``anthropic-version`` or ``x-api-key`` says Anthropic; anything
    else gets OpenAI's shape, which most generic clients understand.
    """
    path = path.partition("?")[0]
    if path.startswith("/v1beta/") or path == "/v1beta" or ":" in path or "%3a" in path.lower():
        return _G
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return _A
    names = {name.lower() for name, _ in headers}
    if b"x-goog-api-key" in names:
        return _G
    if b"anthropic-version" in names or b"x-api-key" in names:
        return _A
    return _O


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One served route, for documentation (the admin API's ``/api/adapters``)."""

    name: str
    kind: ProviderKind
    method: str
    path: str  # "{model}" stands for a Gemini model id
    billable: bool
    streaming: str  # "body": the body's "stream" field decides; "always"; "never"
    selector: str | None = None  # what picks this route among several on the same path


def route_catalogue() -> list[RouteInfo]:
    """Every route :func:`match_route` serves, read from the same tables it matches against."""

    def streaming(spec: _Spec) -> str:
        return "body" if spec.stream_format is None else "never"

    out = []
    for path, methods in _EXACT.items():
        for method, spec in methods.items():
            selector = "the default (no Anthropic or Gemini marker)" if path == "/v1/models" else None
            out.append(
                RouteInfo(spec.name, spec.kind, method, path, spec.billable, streaming(spec), selector)
            )
    for spec, selector in (
        (_ANTHROPIC_MODELS, "anthropic-version header"),
        (_GEMINI_V1_MODELS, "x-goog-api-key or x-goog-api-client header, or ?key="),
    ):
        out.append(RouteInfo(spec.name, spec.kind, "GET", "/v1/models", spec.billable, "never", selector))
    for version in _GEMINI_VERSIONS:
        for action, (name, billable) in _GEMINI_ACTIONS.items():
            mode = "always" if action == "streamGenerateContent" else "never"
            out.append(RouteInfo(name, _G, "POST", f"/{version}/models/{{model}}:{action}", billable, mode))
    return out
