"""match_route / guess_dialect: the allowlist, the path tricks it refuses, and what it forwards upstream."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.routes import Route, RouteRejection, guess_dialect, match_route
from trioproxy.snapshot import ProviderKind
from trioproxy.usage import StreamFormat

OPENAI, ANTHROPIC, GEMINI = ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.GEMINI
NO_HEADERS: list[tuple[bytes, bytes]] = []
GOOG = [(b"x-goog-api-key", b"k"), (b"x-goog-api-client", b"google-genai-sdk/1.0")]
ANTH = [(b"anthropic-version", b"2023-06-01"), (b"x-api-key", b"k")]

# Every upstream path the gateway may ever produce.
ALLOWED_EXACT = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1beta/models",
}
ALLOWED_GEMINI = re.compile(
    r"/(v1beta|v1)/models/[A-Za-z0-9][A-Za-z0-9._-]*:"
    r"(generateContent|streamGenerateContent|countTokens|embedContent|batchEmbedContents)"
)


def is_allowed_upstream(path: str) -> bool:
    return path in ALLOWED_EXACT or (ALLOWED_GEMINI.fullmatch(path) is not None and ".." not in path)


def route(method: str, target: str, headers: list[tuple[bytes, bytes]] | None = None) -> Route:
    result = match_route(method, target, headers or NO_HEADERS)
    assert isinstance(result, Route), result
    return result


def rejection(method: str, target: str, headers: list[tuple[bytes, bytes]] | None = None) -> RouteRejection:
    result = match_route(method, target, headers or NO_HEADERS)
    assert isinstance(result, RouteRejection), result
    return result


# -- the table -----------------------------------------------------------------------------------------------

# (method, target, headers, expected route name or status, expected upstream target "path?query")
TABLE: list[tuple[str, str, list[tuple[bytes, bytes]], str | int, str | None]] = [
    # OpenAI
    ("POST", "/v1/chat/completions", [], "openai.chat_completions", "/v1/chat/completions"),
    ("POST", "/v1/completions", [], "openai.completions", "/v1/completions"),
    ("POST", "/v1/embeddings", [], "openai.embeddings", "/v1/embeddings"),
    ("POST", "/v1/responses", [], "openai.responses", "/v1/responses"),
    ("GET", "/v1/models", [], "openai.models", "/v1/models"),
    (
        "POST",
        "/v1/chat/completions?api-version=2024-02-01",
        [],
        "openai.chat_completions",
        "/v1/chat/completions",
    ),
    ("POST", "/v1/chat/completions?key=secret", [], "openai.chat_completions", "/v1/chat/completions"),
    ("GET", "/v1/models?limit=5", [], "openai.models", "/v1/models"),
    ("GET", "/v1/chat/completions", [], 405, None),
    ("PUT", "/v1/chat/completions", [], 405, None),
    ("DELETE", "/v1/models", [], 405, None),
    ("POST", "/v1/models", [], 405, None),
    ("POST", "/v1/files", [], 404, None),
    ("GET", "/v1/files", [], 404, None),
    ("POST", "/v1/fine_tuning/jobs", [], 404, None),
    ("POST", "/v1/batches", [], 404, None),
    ("GET", "/v1/organization/users", [], 404, None),
    ("GET", "/v1/models/gpt-4o", [], 404, None),
    ("GET", "/v1/responses/resp_123", [], 404, None),
    ("POST", "/v1/images/generations", [], 404, None),
    ("POST", "/v1/audio/transcriptions", [], 404, None),
    ("POST", "/v1/chat/completions/", [], 404, None),
    ("POST", "/V1/chat/completions", [], 404, None),
    ("POST", "/chat/completions", [], 404, None),
    ("POST", "/v1/chat/completions;x=1", [], 404, None),
    ("POST", "/", [], 404, None),
    # Anthropic
    ("POST", "/v1/messages", ANTH, "anthropic.messages", "/v1/messages"),
    ("POST", "/v1/messages?beta=true", ANTH, "anthropic.messages", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens", ANTH, "anthropic.count_tokens", "/v1/messages/count_tokens"),
    ("GET", "/v1/models?limit=3", ANTH, "anthropic.models", "/v1/models?limit=3"),
    (
        "GET",
        "/v1/models?after_id=claude-x&limit=2&foo=1",
        ANTH,
        "anthropic.models",
        "/v1/models?limit=2&after_id=claude-x",
    ),
    ("GET", "/v1/messages", ANTH, 405, None),
    ("POST", "/v1/messages/batches", ANTH, 404, None),
    ("GET", "/v1/messages/batches/msgbatch_1", ANTH, 404, None),
    ("POST", "/v1/complete", ANTH, 404, None),
    ("POST", "/v1/files", ANTH, 404, None),
    # Gemini, as google-genai builds the URLs (v1beta by default, v1 with a custom base URL)
    (
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        GOOG,
        "gemini.generate_content",
        "/v1beta/models/gemini-2.5-flash:generateContent",
    ),
    (
        "POST",
        "/v1/models/gemini-2.5-flash:generateContent",
        GOOG,
        "gemini.generate_content",
        "/v1/models/gemini-2.5-flash:generateContent",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
        GOOG,
        "gemini.stream_generate_content",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
        GOOG,
        "gemini.stream_generate_content",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse&key=AIzaSECRET",
        [],
        "gemini.stream_generate_content",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?key=AIzaSECRET&alt=sse",
        [],
        "gemini.stream_generate_content",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.0-flash:countTokens",
        GOOG,
        "gemini.count_tokens",
        "/v1beta/models/gemini-2.0-flash:countTokens",
    ),
    (
        "POST",
        "/v1beta/models/text-embedding-004:embedContent",
        GOOG,
        "gemini.embed_content",
        "/v1beta/models/text-embedding-004:embedContent",
    ),
    (
        "POST",
        "/v1/models/gemini-embedding-001:batchEmbedContents",
        GOOG,
        "gemini.batch_embed_contents",
        "/v1/models/gemini-embedding-001:batchEmbedContents",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-flash%3AgenerateContent",
        GOOG,
        "gemini.generate_content",
        "/v1beta/models/gemini-2.5-flash:generateContent",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent?alt=json",
        GOOG,
        "gemini.generate_content",
        "/v1beta/models/gemini-2.5-flash:generateContent",
    ),
    ("GET", "/v1beta/models", GOOG, "gemini.models", "/v1beta/models"),
    (
        "GET",
        "/v1beta/models?pageSize=5&pageToken=abc%2Fdef&key=x",
        [],
        "gemini.models",
        "/v1beta/models?pageSize=5&pageToken=abc%2Fdef",
    ),
    ("GET", "/v1/models?pageSize=5", GOOG, "gemini.models", "/v1/models?pageSize=5"),
    ("GET", "/v1/models?key=secret", [], "gemini.models", "/v1/models"),
    ("GET", "/v1beta/models/gemini-2.5-flash:generateContent", GOOG, 405, None),
    ("POST", "/v1beta/models", GOOG, 405, None),
    ("POST", "/v1beta/models/gemini-2.5-flash:generatecontent", GOOG, 404, None),
    ("POST", "/v1beta/models/gemini-2.5-flash:predict", GOOG, 404, None),
    ("POST", "/v1beta/tunedModels/my-model:generateContent", GOOG, 404, None),
    ("POST", "/v1beta/models/gemini-2.5-flash", GOOG, 404, None),
    ("GET", "/v1beta/models/gemini-2.5-flash", GOOG, 404, None),
    ("POST", "/v1beta/files", GOOG, 404, None),
    ("POST", "/upload/v1beta/files", GOOG, 404, None),
    ("POST", "/v1beta/cachedContents", GOOG, 404, None),
    ("POST", "/v1alpha/models/gemini-2.5-flash:generateContent", GOOG, 404, None),
    ("POST", "/v1beta/models/-bad:generateContent", GOOG, 404, None),
    ("POST", "/v1beta/models/a/b:generateContent", GOOG, 404, None),
    ("POST", "/v1beta/models/:generateContent", GOOG, 404, None),
    ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=proto", GOOG, 400, None),
    ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&alt=json", GOOG, 400, None),
    ("POST", "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse", GOOG, 400, None),
    ("GET", "/v1beta/models?pageSize=abc", GOOG, 400, None),
    ("GET", "/v1beta/models?pageSize=1&pageSize=2", GOOG, 400, None),
    ("GET", "/v1beta/models?pageToken=", GOOG, 400, None),
    ("GET", "/v1/models?limit=12345", ANTH, 400, None),
    # Path tricks: refused outright
    ("POST", "/v1/../v1/chat/completions", [], 400, None),
    ("POST", "/v1/chat/../files", [], 400, None),
    ("POST", "/v1/./chat/completions", [], 400, None),
    ("POST", "/v1/chat/completions/..", [], 400, None),
    ("POST", "/v1/%2e%2e/files", [], 400, None),
    ("POST", "/v1/%2E%2E/files", [], 400, None),
    ("POST", "/v1/chat%2fcompletions", [], 400, None),
    ("POST", "/v1/chat%2Fcompletions", [], 400, None),
    ("POST", "/v1/chat%5ccompletions", [], 400, None),
    ("POST", "/v1/chat\\completions", [], 400, None),
    ("POST", "/v1//chat/completions", [], 400, None),
    ("POST", "//v1/chat/completions", [], 400, None),
    ("POST", "/v1/chat/completions%00", [], 400, None),
    ("POST", "/v1/chat/completions\x00", [], 400, None),
    ("POST", "/v1/chat/completions\t", [], 400, None),
    ("POST", "/v1/chat/completions é", [], 400, None),
    ("POST", "/v1/chat/compl\u00e9tions", [], 400, None),
    ("POST", "/v1/chat/completions#frag", [], 400, None),
    ("POST", "/v1/%63hat/completions", [], 400, None),
    ("POST", "/v1/chat/completions%", [], 400, None),
    ("POST", "/v1/chat/completions%zz", [], 400, None),
    ("POST", "/v1beta/models/gemini..pro:generateContent", GOOG, 400, None),
    ("POST", "/v1beta/models/%2e%2e%2fv1beta%2ffiles:generateContent", GOOG, 400, None),
    ("POST", "/v1beta/models%2Fgemini-2.5-flash:generateContent", GOOG, 400, None),
    ("POST", "http://api.openai.com/v1/chat/completions", [], 400, None),
    ("GET", "http://169.254.169.254/latest/meta-data/", [], 400, None),
    ("OPTIONS", "*", [], 400, None),
    ("CONNECT", "api.openai.com:443", [], 400, None),
    ("POST", "", [], 400, None),
    ("POST", "v1/chat/completions", [], 400, None),
]


@pytest.mark.parametrize(("method", "target", "headers", "expected", "upstream"), TABLE)
def test_route_table(
    method: str, target: str, headers: list[tuple[bytes, bytes]], expected: str | int, upstream: str | None
) -> None:
    result = match_route(method, target, headers)
    if isinstance(expected, int):
        assert isinstance(result, RouteRejection), result
        assert result.status == expected
        return
    assert isinstance(result, Route), result
    assert result.name == expected
    assert result.method == method
    full = result.upstream_path + ("?" + result.upstream_query if result.upstream_query else "")
    assert full == upstream
    assert is_allowed_upstream(result.upstream_path)


def test_table_is_large_enough() -> None:
    assert len(TABLE) >= 60
    assert sum(1 for row in TABLE if row[3] == 400) >= 25


# -- route attributes ----------------------------------------------------------------------------------------


def test_openai_chat_attributes() -> None:
    r = route("POST", "/v1/chat/completions")
    assert (r.kind, r.model, r.stream_format, r.has_body, r.billable) == (OPENAI, None, None, True, True)


@pytest.mark.parametrize(
    ("method", "target", "headers", "kind", "fmt", "has_body", "billable"),
    [
        ("POST", "/v1/completions", [], OPENAI, None, True, True),
        ("POST", "/v1/responses", [], OPENAI, None, True, True),
        ("POST", "/v1/embeddings", [], OPENAI, StreamFormat.JSON, True, True),
        ("GET", "/v1/models", [], OPENAI, StreamFormat.JSON, False, False),
        ("POST", "/v1/messages", ANTH, ANTHROPIC, None, True, True),
        ("POST", "/v1/messages/count_tokens", ANTH, ANTHROPIC, StreamFormat.JSON, True, False),
        ("GET", "/v1/models", ANTH, ANTHROPIC, StreamFormat.JSON, False, False),
        ("GET", "/v1beta/models", [], GEMINI, StreamFormat.JSON, False, False),
        ("POST", "/v1beta/models/m:generateContent", [], GEMINI, StreamFormat.JSON, True, True),
        ("POST", "/v1beta/models/m:streamGenerateContent?alt=sse", [], GEMINI, StreamFormat.SSE, True, True),
        ("POST", "/v1beta/models/m:streamGenerateContent", [], GEMINI, StreamFormat.JSON_ARRAY, True, True),
        (
            "POST",
            "/v1beta/models/m:streamGenerateContent?alt=json",
            [],
            GEMINI,
            StreamFormat.JSON_ARRAY,
            True,
            True,
        ),
        ("POST", "/v1beta/models/m:countTokens", [], GEMINI, StreamFormat.JSON, True, False),
        ("POST", "/v1beta/models/m:embedContent", [], GEMINI, StreamFormat.JSON, True, True),
        ("POST", "/v1beta/models/m:batchEmbedContents", [], GEMINI, StreamFormat.JSON, True, True),
    ],
)
def test_route_attributes(
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    kind: ProviderKind,
    fmt: StreamFormat | None,
    has_body: bool,
    billable: bool,
) -> None:
    r = route(method, target, headers)
    assert (r.kind, r.stream_format, r.has_body, r.billable) == (kind, fmt, has_body, billable)


def test_gemini_model_comes_from_the_url() -> None:
    r = route("POST", "/v1beta/models/gemini-2.5-flash-lite:generateContent")
    assert r.model == "gemini-2.5-flash-lite"
    assert route("POST", "/v1/messages").model is None


def test_gemini_model_length_is_bounded() -> None:
    assert isinstance(match_route("POST", f"/v1beta/models/{'a' * 128}:generateContent", NO_HEADERS), Route)
    assert rejection("POST", f"/v1beta/models/{'a' * 129}:generateContent").status == 404


def test_rejections_speak_the_clients_dialect() -> None:
    assert rejection("POST", "/v1beta/files").kind is GEMINI
    assert rejection("GET", "/v1/messages").kind is ANTHROPIC
    assert rejection("POST", "/v1/files").kind is OPENAI
    assert rejection("POST", "/v1/files", ANTH).kind is ANTHROPIC
    assert rejection("POST", "/v1/files", GOOG).kind is GEMINI
    assert rejection("POST", "/v1/models", ANTH).kind is ANTHROPIC
    assert rejection("POST", "/v1beta/models/m:streamGenerateContent?alt=proto").kind is GEMINI


def test_405_names_the_allowed_method_and_404_does_not_echo_the_query() -> None:
    r = rejection("GET", "/v1/chat/completions")
    assert "POST" in r.message
    r = rejection("POST", "/v1/files?key=AIzaSECRET")
    assert "AIzaSECRET" not in r.message
    assert "/v1/files" in r.message


def test_weird_method_is_not_echoed() -> None:
    r = rejection("G<script>", "/v1/models")
    assert r.status == 405
    assert "<script>" not in r.message


def test_page_token_is_reencoded_not_passed_through() -> None:
    r = route("GET", "/v1beta/models?pageToken=a+b%26key%3Dx")
    assert r.upstream_query == "pageToken=a%20b%26key%3Dx"
    assert dict(parse_qsl(r.upstream_query)) == {"pageToken": "a b&key=x"}


# -- guess_dialect -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "kind"),
    [
        ("/v1beta/anything", [], GEMINI),
        ("/v1beta", [], GEMINI),
        ("/v1/models/x:generateContent", [], GEMINI),
        ("/v1/models/x%3AgenerateContent", [], GEMINI),
        ("/v1/files", [(b"x-goog-api-key", b"k")], GEMINI),
        ("/v1/messages", [], ANTHROPIC),
        ("/v1/messages/batches", [], ANTHROPIC),
        ("/v1/files", [(b"anthropic-version", b"2023-06-01")], ANTHROPIC),
        ("/v1/files", [(b"x-api-key", b"k")], ANTHROPIC),
        ("/v1/files", [], OPENAI),
        ("/v1/chat/completions", [(b"authorization", b"Bearer k")], OPENAI),
        ("/v1/messagesX", [], OPENAI),
        ("/", [], OPENAI),
        ("", [], OPENAI),
    ],
)
def test_guess_dialect(path: str, headers: list[tuple[bytes, bytes]], kind: ProviderKind) -> None:
    assert guess_dialect(path, headers) is kind


# -- properties ----------------------------------------------------------------------------------------------

SECRET = "SeCrEt0xKEY"
PIECES = [
    "/",
    "v1",
    "v1beta",
    "v1alpha",
    "chat",
    "completions",
    "messages",
    "count_tokens",
    "models",
    "embeddings",
    "responses",
    "files",
    "batches",
    "gemini-2.5-flash",
    ":generateContent",
    ":streamGenerateContent",
    ":countTokens",
    "%3A",
    "%3a",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%00",
    "..",
    ".",
    "//",
    "\\",
    "\x00",
    "é",
    ";",
    "@",
    "#",
    "*",
    "http:",
    "tunedModels",
    "-",
    "_",
    "~",
    "A",
    "0",
]
QUERY_PIECES = [
    "key=" + SECRET,
    "KEY=x",
    "alt=sse",
    "alt=json",
    "alt=media",
    "pageSize=3",
    "pageToken=" + "tok",
    "limit=2",
    "after_id=a",
    "api_key=" + SECRET,
    "%6Bey=" + SECRET,
    "key",
    "=",
    "&",
    "+",
    "%26",
    "%3D",
]


@st.composite
def targets(draw: st.DrawFn) -> str:
    path = "".join(draw(st.lists(st.sampled_from(PIECES), max_size=12)))
    if draw(st.booleans()):
        path = "/" + path
    if draw(st.booleans()):
        path += draw(st.text(max_size=6))
    query = "&".join(draw(st.lists(st.sampled_from(QUERY_PIECES), max_size=6)))
    return path + ("?" + query if query or draw(st.booleans()) else "")


def valid_targets() -> st.SearchStrategy[str]:
    model = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
    action = st.sampled_from(["generateContent", "streamGenerateContent", "countTokens", "embedContent"])
    gemini = st.builds(
        lambda v, m, a: f"/{v}/models/{m}:{a}", st.sampled_from(["v1", "v1beta"]), model, action
    )
    exact = st.sampled_from(sorted(ALLOWED_EXACT))
    query = st.lists(st.sampled_from(QUERY_PIECES), max_size=5).map("&".join)
    return st.builds(lambda p, q: p + ("?" + q if q else ""), st.one_of(gemini, exact), query)


HEADER_CHOICES = st.sampled_from([NO_HEADERS, GOOG, ANTH, [(b"authorization", b"Bearer x")]])
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])


def check_invariants(result: Route | RouteRejection) -> None:
    if isinstance(result, RouteRejection):
        assert result.status in (400, 404, 405)
        assert SECRET not in result.message
        return
    assert is_allowed_upstream(result.upstream_path), result.upstream_path
    assert SECRET not in result.upstream_query
    assert "key=" not in result.upstream_query
    names = {name for name, _ in parse_qsl(result.upstream_query, keep_blank_values=True)}
    assert names <= {"alt", "pageSize", "pageToken", "limit", "after_id", "before_id"}
    assert all("key" not in name.lower() for name in names)
    assert result.upstream_query.isascii()
    assert result.method in ("GET", "POST")
    assert result.has_body == (result.method == "POST")


@settings(max_examples=examples(400))
@given(method=METHODS, target=targets(), headers=HEADER_CHOICES)
def test_property_no_route_escapes_the_allowlist(
    method: str, target: str, headers: list[tuple[bytes, bytes]]
) -> None:
    check_invariants(match_route(method, target, headers))


@settings(max_examples=examples(300))
@given(method=st.sampled_from(["GET", "POST"]), target=valid_targets(), headers=HEADER_CHOICES)
def test_property_valid_shapes(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> None:
    result = match_route(method, target, headers)
    check_invariants(result)
    path = target.split("?", 1)[0]
    if isinstance(result, Route):
        assert ".." not in result.upstream_path
        if result.kind is GEMINI and result.model is not None:
            assert result.upstream_path == path


@settings(max_examples=examples(300))
@given(method=METHODS, target=st.text(max_size=40), headers=HEADER_CHOICES)
def test_property_arbitrary_text_never_crashes(
    method: str, target: str, headers: list[tuple[bytes, bytes]]
) -> None:
    check_invariants(match_route(method, target, headers))
