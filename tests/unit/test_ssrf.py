"""The upstream address guard: base URL parsing and address classes, over a corpus and hypothesis."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.errors import ValidationError
from trioproxy.snapshot import Origin
from trioproxy.ssrf import BaseURL, is_address_allowed, parse_base_url

# -- is_address_allowed: the corpus --------------------------------------------------------------------------

NEVER = [
    "169.254.169.254",  # AWS/GCP/Azure/OCI metadata
    "169.254.0.1",
    "169.254.255.255",
    "fe80::1",
    "fe80::1%eth0",
    "febf:ffff::1",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "100.100.100.200",  # Alibaba metadata
    "168.63.129.16",  # Azure wire server
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "ff05::2",
    "240.0.0.1",
    "255.255.255.255",
    "::ffff:169.254.169.254",  # IPv4-mapped metadata
    "::ffff:0.0.0.0",
    "::ffff:224.0.0.1",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "::169.254.169.254",  # deprecated IPv4-compatible
    "::127.0.0.1",
    "fec0::1",
    "100::1",
]
PRIVATE = [
    "127.0.0.1",
    "127.255.255.254",
    "::1",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.255",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:127.0.0.1",
    "::ffff:10.1.2.3",
    "::ffff:192.168.0.1",
    "::ffff:100.64.1.1",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "192.0.2.10",  # documentation
    "198.51.100.1",
    "203.0.113.200",
    "198.18.0.1",  # benchmarking
    "2001:db8::1",
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "104.18.6.192",
    "142.250.74.106",
    "172.15.255.255",  # just outside 172.16/12
    "172.32.0.0",
    "100.63.255.255",  # just outside CGNAT
    "100.128.0.0",
    "169.253.255.255",
    "169.255.0.0",
    "2606:4700::6810:6c0",
    "2a00:1450:4001:82b::200a",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize("ip", NEVER)
@pytest.mark.parametrize("allow_private", [False, True])
def test_never_allowed(ip: str, allow_private: bool) -> None:
    assert not is_address_allowed(ip, allow_private=allow_private)


@pytest.mark.parametrize("ip", PRIVATE)
def test_private_only_when_opted_in(ip: str) -> None:
    assert not is_address_allowed(ip, allow_private=False)
    assert is_address_allowed(ip, allow_private=True)


@pytest.mark.parametrize("ip", PUBLIC)
@pytest.mark.parametrize("allow_private", [False, True])
def test_public_allowed(ip: str, allow_private: bool) -> None:
    assert is_address_allowed(ip, allow_private=allow_private)


@pytest.mark.parametrize(
    "text", ["", "localhost", "2852039166", "0xA9FEA9FE", "127.1", "1.2.3.4.5", "::g", "a" * 50]
)
def test_unparsable_is_refused(text: str) -> None:
    assert not is_address_allowed(text, allow_private=True)


# -- is_address_allowed: properties --------------------------------------------------------------------------

NEVER_NETS = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")]
PRIVATE_NETS = [
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
]


def effective(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a packet to ``ip`` really reaches: the IPv4 inside mapped, NAT64 and 6to4 forms."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(ip.packed[-4:])
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


# IPv4 embedded in IPv6 forms, so hypothesis reaches them as often as plain addresses.
EMBEDDED = st.ip_addresses(v=4).flatmap(
    lambda v4: st.sampled_from(
        [
            ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + v4.packed),
            ipaddress.IPv6Address(bytes.fromhex("0064ff9b0000000000000000") + v4.packed),
            ipaddress.IPv6Address(b"\x20\x02" + v4.packed + b"\x00" * 10),
        ]
    )
)
ANY_ADDRESS = st.one_of(st.ip_addresses(), EMBEDDED)


@settings(max_examples=examples(300))
@given(ip=st.ip_addresses(v=4))
def test_property_ipv4_mapped_and_nat64_forms_judged_like_ipv4(ip: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    nat64 = ipaddress.IPv6Address(bytes.fromhex("0064ff9b0000000000000000") + ip.packed)
    for allow_private in (False, True):
        expected = is_address_allowed(str(ip), allow_private=allow_private)
        assert is_address_allowed(str(mapped), allow_private=allow_private) == expected
        assert is_address_allowed(str(nat64), allow_private=allow_private) == expected


@settings(max_examples=examples(300))
@given(ip=ANY_ADDRESS)
def test_property_opting_in_only_widens(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if is_address_allowed(str(ip), allow_private=False):
        assert is_address_allowed(str(ip), allow_private=True)


@settings(max_examples=examples(300))
@given(ip=ANY_ADDRESS)
def test_property_unroutable_never_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    e = effective(ip)
    if e.is_link_local or e.is_multicast or e.is_unspecified or (e.is_reserved and not e.is_loopback):
        assert not is_address_allowed(str(ip), allow_private=True)


@settings(max_examples=examples(300))
@given(ip=ANY_ADDRESS)
def test_property_default_allows_only_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if is_address_allowed(str(ip), allow_private=False):
        e = effective(ip)
        assert e.is_global
        assert not e.is_private
        assert not e.is_loopback


@settings(max_examples=examples(300))
@given(st.one_of(*(st.ip_addresses(network=str(n)) for n in NEVER_NETS)))
def test_property_never_ranges(ip: ipaddress.IPv4Address) -> None:
    assert not is_address_allowed(str(ip), allow_private=True)


@settings(max_examples=examples(300))
@given(st.one_of(*(st.ip_addresses(network=str(n)) for n in PRIVATE_NETS)))
def test_property_private_ranges(ip: ipaddress.IPv4Address) -> None:
    if str(ip) == "100.100.100.200":
        return
    assert not is_address_allowed(str(ip), allow_private=False)
    assert is_address_allowed(str(ip), allow_private=True)


# -- parse_base_url ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allow_private", "expected"),
    [
        ("https://api.openai.com", False, BaseURL(Origin("https", "api.openai.com", 443), "")),
        ("https://api.openai.com/", False, BaseURL(Origin("https", "api.openai.com", 443), "")),
        ("https://openrouter.ai/api", False, BaseURL(Origin("https", "openrouter.ai", 443), "/api")),
        ("https://openrouter.ai/api/", False, BaseURL(Origin("https", "openrouter.ai", 443), "/api")),
        (
            "https://gw.example.com/a/b-c/d_e~.f",
            False,
            BaseURL(Origin("https", "gw.example.com", 443), "/a/b-c/d_e~.f"),
        ),
        ("HTTPS://API.Anthropic.COM", False, BaseURL(Origin("https", "api.anthropic.com", 443), "")),
        ("http://example.com:8080", False, BaseURL(Origin("http", "example.com", 8080), "")),
        ("http://example.com", False, BaseURL(Origin("http", "example.com", 80), "")),
        ("https://example.com:443/v1", False, BaseURL(Origin("https", "example.com", 443), "/v1")),
        ("https://8.8.8.8", False, BaseURL(Origin("https", "8.8.8.8", 443), "")),
        (
            "https://[2606:4700::6810:6c0]:8443",
            False,
            BaseURL(Origin("https", "2606:4700::6810:6c0", 8443), ""),
        ),
        ("http://127.0.0.1:11434", True, BaseURL(Origin("http", "127.0.0.1", 11434), "")),
        ("http://localhost:11434", True, BaseURL(Origin("http", "localhost", 11434), "")),
        ("http://ollama:11434", True, BaseURL(Origin("http", "ollama", 11434), "")),
        ("http://my_service:8000", False, BaseURL(Origin("http", "my_service", 8000), "")),
        ("http://[::1]:8080", True, BaseURL(Origin("http", "::1", 8080), "")),
        ("http://10.0.0.5/api", True, BaseURL(Origin("http", "10.0.0.5", 80), "/api")),
    ],
)
def test_parse_base_url_accepts(url: str, allow_private: bool, expected: BaseURL) -> None:
    assert parse_base_url(url, allow_private=allow_private) == expected


# The reliability plan's S-12 corpus, as far as it concerns parsing (DNS answers are checked at connect time).
REFUSED_ALWAYS = [
    "http://169.254.169.254",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]",
    "http://[::ffff:169.254.169.254]",
    "http://[::ffff:a9fe:a9fe]",
    "http://2852039166",
    "http://0xA9FEA9FE",
    "http://0xa9.0xfe.0xa9.0xfe",
    "http://0251.0376.0251.0376",
    "http://169.254.43518",
    "http://127.1",
    "http://0",
    "http://0.0.0.0",
    "http://[::]",
    "http://[fe80::1%25eth0]",
    "http://[fe80::1]",
    "http://224.0.0.1",
    "http://100.100.100.200",
    "http://metadata.google.internal",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata",
    "http://instance-data",
    "file:///etc/passwd",
    "gopher://127.0.0.1:25/",
    "ftp://example.com",
    "dict://example.com:11211/",
    "ws://example.com",
    "javascript:alert(1)",
    "//example.com",
    "example.com",
    "https://",
    "https:///path",
    "https://:443",
    "https://user:pass@example.com",
    "https://user@example.com",
    "https://example.com@169.254.169.254",
    "https://example.com?x=1",
    "https://example.com/api?key=secret",
    "https://example.com#frag",
    "https://example.com/api/../admin",
    "https://example.com/./api",
    "https://example.com//api",
    "https://example.com/a%2fb",
    "https://example.com\\@169.254.169.254",
    "https://example.com:0",
    "https://example.com:65536",
    "https://example.com:99999999",
    "https://example.com:http",
    "https://example.com:-1",
    "https://exa mple.com",
    "https://exämple.com",
    " https://example.com",
    "https://example.com\n",
    "https://example..com",
    "https://-example.com",
    "https://example.com.",
    "https://[::1",
    "https://[::1]x",
    "https://[not-ipv6]",
    "https://example.123",
    "",
]
REFUSED_UNLESS_PRIVATE = [
    "http://127.0.0.1",
    "http://127.0.0.1:8080/v1",
    "http://[::1]",
    "http://10.0.0.1",
    "http://172.16.0.1",
    "http://192.168.1.1",
    "http://100.64.0.1",
    "http://[fc00::1]",
    "http://[::ffff:127.0.0.1]",
    "http://localhost",
    "http://LOCALHOST:8080",
    "http://api.localhost",
]


def test_corpus_is_large_enough() -> None:
    assert len(REFUSED_ALWAYS) + len(REFUSED_UNLESS_PRIVATE) >= 60


@pytest.mark.parametrize("url", REFUSED_ALWAYS)
@pytest.mark.parametrize("allow_private", [False, True])
def test_parse_base_url_refuses(url: str, allow_private: bool) -> None:
    with pytest.raises(ValidationError) as info:
        parse_base_url(url, allow_private=allow_private)
    assert info.value.status_hint == 400


@pytest.mark.parametrize("url", REFUSED_UNLESS_PRIVATE)
def test_private_base_urls_need_opt_in(url: str) -> None:
    with pytest.raises(ValidationError):
        parse_base_url(url, allow_private=False)
    parse_base_url(url, allow_private=True)


def test_errors_do_not_echo_credentials_or_query() -> None:
    for url in (
        "https://user:hunter2@example.com",
        "https://example.com/?key=hunter2",
        "https://example.com#hunter2",
    ):
        with pytest.raises(ValidationError) as info:
            parse_base_url(url, allow_private=True)
        assert "hunter2" not in info.value.message


@settings(max_examples=examples(300))
@given(ip=st.ip_addresses(v=4), allow_private=st.booleans())
def test_property_ip_literal_hosts_follow_the_address_rule(
    ip: ipaddress.IPv4Address, allow_private: bool
) -> None:
    url = f"https://{ip}:8443/api"
    if is_address_allowed(str(ip), allow_private=allow_private):
        assert parse_base_url(url, allow_private=allow_private) == BaseURL(
            Origin("https", str(ip), 8443), "/api"
        )
    else:
        with pytest.raises(ValidationError):
            parse_base_url(url, allow_private=allow_private)


@settings(max_examples=examples(300))
@given(ip=st.ip_addresses(v=6), allow_private=st.booleans())
def test_property_ipv6_literal_hosts_follow_the_address_rule(
    ip: ipaddress.IPv6Address, allow_private: bool
) -> None:
    url = f"http://[{ip}]"
    if is_address_allowed(str(ip), allow_private=allow_private):
        assert parse_base_url(url, allow_private=allow_private).origin == Origin("http", str(ip), 80)
    else:
        with pytest.raises(ValidationError):
            parse_base_url(url, allow_private=allow_private)


@settings(max_examples=examples(300))
@given(url=st.text(max_size=60), allow_private=st.booleans())
def test_property_arbitrary_text_parses_or_raises_validation_error(url: str, allow_private: bool) -> None:
    try:
        result = parse_base_url(url, allow_private=allow_private)
    except ValidationError:
        return
    assert result.origin.scheme in ("http", "https")
    assert 1 <= result.origin.port <= 65535
    assert "@" not in result.origin.host
    assert "/" not in result.origin.host
    assert result.path_prefix == "" or (
        result.path_prefix.startswith("/") and not result.path_prefix.endswith("/")
    )
