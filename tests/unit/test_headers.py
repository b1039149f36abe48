"""Header policy: gateway key extraction, upstream allowlist, response denylist, client address, redaction."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.errors import ConfigError, ValidationError
from trioproxy.headers import (
    build_upstream_headers,
    check_extra_headers,
    client_address,
    extract_gateway_key,
    filter_response_headers,
    redact,
)
from trioproxy.snapshot import ProviderKind

OPENAI, ANTHROPIC, GEMINI = ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.GEMINI
H = list[tuple[bytes, bytes]]


# -- extract_gateway_key -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([(b"authorization", b"Bearer tpk_abc")], "", "tpk_abc"),
        ([(b"authorization", b"bearer   tpk_abc  ")], "", "tpk_abc"),
        ([(b"authorization", b"BEARER tpk_abc")], "", "tpk_abc"),
        ([(b"x-api-key", b"tpk_ant")], "", "tpk_ant"),
        ([(b"x-goog-api-key", b"tpk_goog")], "", "tpk_goog"),
        ([], "key=tpk_q", "tpk_q"),
        ([], "alt=sse&key=tpk%5Fq%2B1", "tpk_q+1"),
        ([], "alt=sse&key=&key=second", "second"),
        ([(b"authorization", b"Bearer first"), (b"x-api-key", b"second")], "key=third", "first"),
        ([(b"x-api-key", b"second"), (b"authorization", b"Bearer first")], "", "first"),
        ([(b"authorization", b"Bearer "), (b"x-api-key", b"second")], "", "second"),
        ([(b"authorization", b"Basic dXNlcjpwYXNz"), (b"x-goog-api-key", b"g")], "", "g"),
        ([(b"x-api-key", b""), (b"x-goog-api-key", b"g")], "", "g"),
        ([(b"x-api-key", b"   ")], "key=q", "q"),
        ([(b"x-api-key", b"\xff\xfe")], "", None),
        ([(b"authorization", b"Bearer")], "", None),
        ([], "", None),
        ([], "keys=x&apikey=y", None),
        ([(b"cookie", b"key=x")], "", None),
    ],
)
def test_extract_gateway_key(headers: H, query: str, expected: str | None) -> None:
    assert extract_gateway_key(headers, query) == expected


# -- build_upstream_headers ----------------------------------------------------------------------------------

# Headers a client (browser, SDK, proxy chain) may send that must never reach the provider.
NEVER_FORWARDED = [
    b"authorization",
    b"x-api-key",
    b"x-goog-api-key",
    b"api-key",
    b"proxy-authorization",
    b"cookie",
    b"origin",
    b"referer",
    b"user-agent",
    b"forwarded",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-real-ip",
    b"true-client-ip",
    b"x-client-ip",
    b"x-cluster-client-ip",
    b"cf-connecting-ip",
    b"cf-ipcountry",
    b"cf-ray",
    b"fastly-client-ip",
    b"x-request-id",
    b"traceparent",
    b"tracestate",
    b"baggage",
    b"x-stainless-os",
    b"x-stainless-arch",
    b"x-stainless-lang",
    b"x-stainless-package-version",
    b"x-stainless-retry-count",
    b"openai-organization",
    b"openai-project",
    b"sec-fetch-mode",
    b"sec-ch-ua",
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"upgrade",
    b"transfer-encoding",
    b"trailer",
    b"expect",
    b"x-goog-user-project",
    b"x-goog-api-client",
    b"x-amz-security-token",
    b"x-amz-date",
    b"host",
    b"content-length",
    b"accept-encoding",
    b"x-custom-anything",
    b"idempotency-key",
    b"x-ratelimit-bypass",
]
MARK = b"client-value-7f3a"


def build(kind: ProviderKind, client: H, **overrides: object) -> H:
    args: dict[str, object] = {
        "secret": "sk-provider-secret",
        "host": "api.example.com",
        "user_agent": "trioproxy/0.1",
        "extra_headers": (),
        "content_length": 42,
        "request_id": "req-123",
    }
    args.update(overrides)
    return build_upstream_headers(kind, client, **args)  # type: ignore[arg-type]


def values(headers: H, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def test_never_forwarded_list_is_long_enough() -> None:
    assert len(NEVER_FORWARDED) >= 30


@pytest.mark.parametrize("kind", list(ProviderKind))
@pytest.mark.parametrize("name", NEVER_FORWARDED)
def test_client_header_never_forwarded(kind: ProviderKind, name: bytes) -> None:
    out = build(kind, [(name, MARK), (b"content-type", b"application/json")])
    assert all(MARK not in value for _, value in out), (name, out)


@pytest.mark.parametrize("kind", list(ProviderKind))
def test_all_never_forwarded_at_once(kind: ProviderKind) -> None:
    out = build(kind, [(name, MARK) for name in NEVER_FORWARDED])
    assert all(MARK not in value for _, value in out)


def test_openai_headers_exactly() -> None:
    client = [
        (b"content-type", b"application/json"),
        (b"accept", b"text/event-stream"),
        (b"openai-beta", b"assistants=v2"),
        (b"anthropic-version", b"2023-06-01"),
        (b"authorization", b"Bearer tpk_client"),
    ]
    assert build(OPENAI, client) == [
        (b"host", b"api.example.com"),
        (b"content-type", b"application/json"),
        (b"accept", b"text/event-stream"),
        (b"openai-beta", b"assistants=v2"),
        (b"authorization", b"Bearer sk-provider-secret"),
        (b"user-agent", b"trioproxy/0.1"),
        (b"accept-encoding", b"identity"),
        (b"content-length", b"42"),
        (b"x-request-id", b"req-123"),
    ]


def test_anthropic_headers_exactly() -> None:
    client = [
        (b"content-type", b"application/json"),
        (b"anthropic-version", b"2023-06-01"),
        (b"anthropic-beta", b"prompt-caching-2024-07-31"),
        (b"anthropic-beta", b"context-1m-2025-08-07"),
        (b"openai-beta", b"x"),
        (b"x-api-key", b"tpk_client"),
    ]
    assert build(ANTHROPIC, client, content_length=None) == [
        (b"host", b"api.example.com"),
        (b"content-type", b"application/json"),
        (b"anthropic-version", b"2023-06-01"),
        (b"anthropic-beta", b"prompt-caching-2024-07-31"),
        (b"anthropic-beta", b"context-1m-2025-08-07"),
        (b"x-api-key", b"sk-provider-secret"),
        (b"user-agent", b"trioproxy/0.1"),
        (b"accept-encoding", b"identity"),
        (b"x-request-id", b"req-123"),
    ]


def test_anthropic_version_defaults_when_absent() -> None:
    out = build(ANTHROPIC, [(b"content-type", b"application/json")])
    assert values(out, b"anthropic-version") == [b"2023-06-01"]


def test_gemini_headers_exactly() -> None:
    client = [
        (b"content-type", b"application/json"),
        (b"x-goog-api-key", b"tpk_client"),
        (b"x-goog-api-client", b"google-genai-sdk/1.40.0 gl-python/3.11"),
        (b"anthropic-beta", b"x"),
    ]
    assert build(GEMINI, client) == [
        (b"host", b"api.example.com"),
        (b"content-type", b"application/json"),
        (b"x-goog-api-key", b"sk-provider-secret"),
        (b"user-agent", b"trioproxy/0.1"),
        (b"accept-encoding", b"identity"),
        (b"content-length", b"42"),
        (b"x-request-id", b"req-123"),
    ]


def test_single_valued_headers_forward_only_the_first() -> None:
    out = build(
        ANTHROPIC,
        [
            (b"content-type", b"a/b"),
            (b"content-type", b"c/d"),
            (b"anthropic-version", b"1"),
            (b"anthropic-version", b"2"),
            (b"accept", b"x"),
            (b"accept", b"y"),
        ],
    )
    assert values(out, b"content-type") == [b"a/b"]
    assert values(out, b"anthropic-version") == [b"1"]
    assert values(out, b"accept") == [b"x", b"y"]


def test_upper_case_client_names_are_matched() -> None:
    out = build(OPENAI, [(b"Content-Type", b"application/json"), (b"Cookie", MARK)])
    assert values(out, b"content-type") == [b"application/json"]
    assert all(MARK not in v for _, v in out)


def test_extra_headers_add_and_replace() -> None:
    out = build(
        ANTHROPIC,
        [(b"anthropic-version", b"2023-01-01")],
        extra_headers=(
            ("Anthropic-Version", "2023-06-01"),
            ("X-Team", "a"),
            ("x-team", "b"),
            ("User-Agent", "u"),
        ),
    )
    assert values(out, b"anthropic-version") == [b"2023-06-01"]
    assert values(out, b"x-team") == [b"a", b"b"]
    assert values(out, b"user-agent") == [b"u"]
    assert values(out, b"x-api-key") == [b"sk-provider-secret"]


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "x-api-key",
        "X-Goog-Api-Key",
        "host",
        "Content-Length",
        "transfer-encoding",
        "connection",
        "accept-encoding",
        "te",
        "upgrade",
        "x-request-id",
        "proxy-authorization",
        "expect",
        "Cookie",
    ],
)
def test_extra_headers_cannot_override_gateway_owned(name: str) -> None:
    with pytest.raises(ConfigError, match="set by the gateway"):
        build(OPENAI, [], extra_headers=((name, "evil"),))
    with pytest.raises(ValidationError, match="set by the gateway"):
        check_extra_headers([(name, "evil")])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("bad name", "s3cr3t"),
        ("x-a\r\nx-b", "s3cr3t"),
        ("", "s3cr3t"),
        ("x-a", "s3cr3t\r\nx-b: 1"),
        ("x-a", "s3cr3t\x00"),
        ("x-a", "s3cr3t é"),
    ],
)
def test_extra_headers_must_be_valid(name: str, value: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_extra_headers([(name, value)])
    assert "s3cr3t" not in info.value.message


def test_valid_extra_headers_pass() -> None:
    check_extra_headers([("OpenAI-Organization", "org-123"), ("x-empty", "")])


@pytest.mark.parametrize("field", ["secret", "host", "user_agent", "request_id"])
def test_invalid_gateway_values_raise_config_error_without_echo(field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(OPENAI, [], **{field: "sk-abc\r\nx-injected: 1"})
    assert "sk-abc" not in info.value.message


@settings(max_examples=examples(200))
@given(
    kind=st.sampled_from(list(ProviderKind)),
    client=st.lists(st.tuples(st.binary(min_size=1, max_size=20).map(bytes.lower), st.binary(max_size=20))),
)
def test_property_only_allowlisted_client_headers_pass(kind: ProviderKind, client: H) -> None:
    out = build(kind, client)
    gateway_owned = {
        b"host",
        b"user-agent",
        b"accept-encoding",
        b"content-length",
        b"x-request-id",
        b"authorization",
        b"x-api-key",
        b"x-goog-api-key",
        b"anthropic-version",
    }
    allowed = {b"content-type", b"accept", b"openai-beta", b"anthropic-version", b"anthropic-beta"}
    for name, value in out:
        if name in gateway_owned and (name, value) not in client:
            continue
        assert name in allowed
        assert (name, value) in client
    assert values(out, b"host") == [b"api.example.com"]
    assert values(out, b"accept-encoding") == [b"identity"]
    assert len([n for n, _ in out if n in (b"authorization", b"x-api-key", b"x-goog-api-key")]) == 1


# -- filter_response_headers ---------------------------------------------------------------------------------

DROPPED_RESPONSE = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authenticate",
    b"content-length",
    b"set-cookie",
    b"openai-organization",
    b"openai-project",
    b"anthropic-organization-id",
    b"x-ratelimit-limit-requests",
    b"x-ratelimit-remaining-tokens",
    b"anthropic-ratelimit-requests-limit",
    b"anthropic-ratelimit-tokens-reset",
    b"cf-ray",
    b"cf-cache-status",
    b"server",
    b"via",
    b"x-request-id",
    b"request-id",
    b"alt-svc",
    b"strict-transport-security",
    b"nel",
    b"report-to",
    b"x-envoy-upstream-service-time",
]
KEPT_RESPONSE = [
    b"content-type",
    b"retry-after",
    b"cache-control",
    b"openai-processing-ms",
    b"openai-version",
    b"date",
    b"x-custom",
]


@pytest.mark.parametrize("name", DROPPED_RESPONSE)
def test_response_header_dropped(name: bytes) -> None:
    assert filter_response_headers([(name, b"v"), (b"content-type", b"application/json")]) == [
        (b"content-type", b"application/json")
    ]


@pytest.mark.parametrize("name", KEPT_RESPONSE)
def test_response_header_kept(name: bytes) -> None:
    assert filter_response_headers([(name, b"v")]) == [(name, b"v")]


def test_headers_named_in_connection_are_dropped() -> None:
    headers = [
        (b"connection", b"keep-alive, X-Secret-Hop ,close"),
        (b"x-secret-hop", b"1"),
        (b"close", b"odd but named"),
        (b"content-type", b"text/event-stream"),
        (b"retry-after", b"3"),
    ]
    assert filter_response_headers(headers) == [
        (b"content-type", b"text/event-stream"),
        (b"retry-after", b"3"),
    ]


def test_response_names_are_lowercased_and_order_kept() -> None:
    headers = [(b"X-B", b"2"), (b"Set-Cookie", b"a=b"), (b"x-a", b"1"), (b"X-B", b"3")]
    assert filter_response_headers(headers) == [(b"x-b", b"2"), (b"x-a", b"1"), (b"x-b", b"3")]


# -- client_address ------------------------------------------------------------------------------------------

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", [b"1.2.3.4"], "203.0.113.9"),  # untrusted peer: XFF ignored
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", [b"198.51.100.7"], "198.51.100.7"),
        ("10.0.0.1", [b"6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # left-hand hops are the client's own words
        ("10.0.0.1", [b"6.6.6.6, 198.51.100.7, 10.0.0.5"], "198.51.100.7"),  # skip our second proxy
        (
            "10.0.0.1",
            [b"6.6.6.6", b"198.51.100.7, 10.1.1.1"],
            "198.51.100.7",
        ),  # several headers join in order
        ("10.0.0.1", [b"10.9.9.9, 10.0.0.5"], "10.9.9.9"),  # all trusted: the left-most
        ("10.0.0.1", [b"garbage, 198.51.100.7"], "198.51.100.7"),
        (
            "10.0.0.1",
            [b"198.51.100.7, garbage"],
            "10.0.0.1",
        ),  # malformed hop: stop at the last trusted address
        ("10.0.0.1", [b"198.51.100.7:4711"], "198.51.100.7"),
        ("10.0.0.1", [b"[2001:db8::7]:443"], "2001:db8::7"),
        ("10.0.0.1", [b"2001:db8::7"], "2001:db8::7"),
        ("::ffff:10.0.0.1", [b"198.51.100.7"], "198.51.100.7"),  # dual-stack listener
        ("::ffff:203.0.113.9", [b"198.51.100.7"], "203.0.113.9"),
        ("fd00::1", [b"198.51.100.7"], "198.51.100.7"),
        ("not-an-ip", [b"198.51.100.7"], "not-an-ip"),
    ],
)
def test_client_address(peer: str, xff: list[bytes], expected: str) -> None:
    headers = [(b"x-forwarded-for", value) for value in xff] + [(b"x-real-ip", b"9.9.9.9")]
    assert client_address(peer, headers, TRUSTED) == expected


def test_client_address_without_trusted_proxies_is_the_peer() -> None:
    assert client_address("10.0.0.1", [(b"x-forwarded-for", b"1.2.3.4")], []) == "10.0.0.1"


@settings(max_examples=examples(200))
@given(peer=st.ip_addresses(v=4), hops=st.lists(st.ip_addresses(v=4), max_size=5))
def test_property_untrusted_peer_always_wins(
    peer: ipaddress.IPv4Address, hops: list[ipaddress.IPv4Address]
) -> None:
    if peer in TRUSTED[0]:
        return
    xff = ", ".join(str(h) for h in hops).encode()
    assert client_address(str(peer), [(b"x-forwarded-for", xff)], TRUSTED) == str(peer)


# -- redact --------------------------------------------------------------------------------------------------

GATEWAY_KEY = "tpk_3fZq9X1bW2cV4nM5kL6jH7gF8dS9aP0oI1uY2t"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer sk-proj-abcdefghijklmnop1234", "sk-proj-abcdefghijklmnop1234"),
        ("authorization=Bearer abc.def.ghi", "abc.def.ghi"),
        (
            "GET /v1beta/models?key=AIzaSyA1234567890abcdefghijklmnopqrs HTTP/1.1",
            "AIzaSyA1234567890abcdefghijklmnopqrs",
        ),
        ("https://x/y?alt=sse&key=shortsecret&z=1", "shortsecret"),
        ("x-api-key: sk-ant-api03-AbCdEfGh12345678", "sk-ant-api03-AbCdEfGh12345678"),
        ('{"x-goog-api-key": "opaquevalue99"}', "opaquevalue99"),
        ("headers={'x-api-key': 'anotherone'}", "anotherone"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("Authorization: Token raw-token-xyz", "raw-token-xyz"),
        ("failed with key sk-abcdefghijklmnopqrstuvwx in body", "sk-abcdefghijklmnopqrstuvwx"),
        (
            "Incorrect API key provided: AIzaSyB-1234567890abcdefghijklmno",
            "AIzaSyB-1234567890abcdefghijklmno",
        ),
        (f"invalid gateway key {GATEWAY_KEY}", GATEWAY_KEY),
        ("token aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG in text", "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG"),
        ("api_key=plainvalue&x=1", "plainvalue"),
    ],
)
def test_redact_masks_secrets(text: str, secret: str) -> None:
    masked = redact(text)
    assert secret not in masked
    assert "***" in masked
    assert redact(masked) == masked


@pytest.mark.parametrize(
    "text",
    [
        "request 3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b failed",  # UUID request ids survive
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # single-case hex survives
        "upstream answered 502 Bad Gateway after 3.2 s",
        "model gemini-2.5-flash-preview-05-20 not found",
        "the monkey=banana parameter",
    ],
)
def test_redact_leaves_ordinary_text(text: str) -> None:
    assert redact(text) == text


SECRET_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-."
FILLER = st.text(alphabet=" \t\n,;:()[]{}<>!?/|", max_size=20)


@settings(max_examples=examples(300))
@given(secret=st.text(alphabet=SECRET_CHARS, min_size=6, max_size=60), prefix=FILLER, suffix=FILLER)
def test_property_credentials_never_survive(secret: str, prefix: str, suffix: str) -> None:
    templates = (
        "Authorization: Bearer {}",
        "authorization: {}",
        "/v1beta/models?alt=sse&key={}",
        "x-goog-api-key: {}",
        '{{"x-api-key": "{}"}}',
    )
    for template in templates:
        if secret in template + "***":
            continue  # "uthor" is in the template itself, not a leak
        text = prefix + template.format(secret) + suffix
        assert secret not in redact(text), text
