"""The upstream address guard: which base URLs a provider may have and which addresses we may connect to.

A provider's base URL is operator input, and an operator account is not the machine's root: without this guard
anyone who can edit a provider can point a pooled request at the cloud metadata service (LiteLLM #24952) or at
an internal admin port, and read the answer back through the gateway. The guard runs twice: when a base URL is
saved (:func:`parse_base_url`, which also checks IP literals) and for every address a host name resolves to
when the pool connects (:func:`is_address_allowed`), so DNS rebinding gains nothing.

Three classes of address (the numbers are the IANA special-purpose registries, RFC 6890 and its updates):

* never: "this network", link-local (where every cloud's metadata service lives), multicast, reserved,
  broadcast, and the metadata addresses that sit outside link-local (AWS IPv6, Alibaba, Azure's wire server);
* private: loopback, RFC 1918, unique-local IPv6, CGNAT and the documentation/benchmark ranges; allowed only
  when the operator opted in (``allow_private_upstreams``) for a local model server;
* everything else is public and allowed.

IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by the IPv4 address they carry:
the kernel or a translator would deliver them there.

Pure code: no I/O, no DNS; the pool resolves and asks.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from trioproxy.errors import ValidationError
from trioproxy.snapshot import Origin

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Never reachable, whatever the operator allows.
_NEVER_V4 = (
    _V4("0.0.0.0/8"),  # "this network": Linux connects 0.x.x.x to the local host
    _V4("169.254.0.0/16"),  # link-local: 169.254.169.254 is the AWS/GCP/Azure/OCI metadata service
    _V4("224.0.0.0/4"),  # multicast
    _V4("240.0.0.0/4"),  # reserved, incl. broadcast 255.255.255.255
    _V4("100.100.100.200/32"),  # Alibaba Cloud metadata (inside CGNAT, so listed before it)
    _V4("168.63.129.16/32"),  # Azure wire server (a public address only Azure VMs can reach)
)
_NEVER_V6 = (
    _V6("::/128"),  # unspecified
    _V6("fe80::/10"),  # link-local
    _V6("fec0::/10"),  # deprecated site-local
    _V6("ff00::/8"),  # multicast
    _V6("fd00:ec2::254/128"),  # AWS metadata over IPv6 (inside fc00::/7, so listed before it)
    _V6("100::/64"),  # discard-only
)
# Reachable only with allow_private.
_PRIVATE_V4 = (
    _V4("127.0.0.0/8"),  # loopback
    _V4("10.0.0.0/8"),
    _V4("172.16.0.0/12"),
    _V4("192.168.0.0/16"),
    _V4("100.64.0.0/10"),  # CGNAT (RFC 6598): the provider's or the ISP's inside
    _V4("192.0.0.0/24"),  # IETF protocol assignments
    _V4("192.0.2.0/24"),  # documentation (TEST-NET-1..3)
    _V4("198.51.100.0/24"),
    _V4("203.0.113.0/24"),
    _V4("198.18.0.0/15"),  # benchmarking
    _V4("192.88.99.0/24"),  # deprecated 6to4 relay anycast
)
_PRIVATE_V6 = (
    _V6("::1/128"),  # loopback
    _V6("fc00::/7"),  # unique local
    _V6("2001:db8::/32"),  # documentation
    _V6("2001::/23"),  # IETF protocol assignments (Teredo, ORCHIDv2, ...)
    _V6("64:ff9b:1::/48"),  # local-use NAT64
)
# IPv6 prefixes that carry an IPv4 address: judged by that address.
_NAT64 = _V6("64:ff9b::/96")
_SIX_TO_FOUR = _V6("2002::/16")

_SCHEMES = {"http": 80, "https": 443}
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
# Names that only ever mean "this machine" or "the metadata service".
_LOCAL_NAMES = ("localhost",)
_METADATA_NAMES = ("metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal")
_MAX_HOST = 253


@dataclass(frozen=True, slots=True)
class BaseURL:
    """A validated provider base URL: where to connect, and what to put before every route path."""

    origin: Origin
    path_prefix: str  # "" or "/api" (no trailing slash)


def is_address_allowed(ip: str, *, allow_private: bool) -> bool:
    """May the gateway open a connection to ``ip``? Anything that does not parse as an address is refused."""
    try:
        address = ipaddress.ip_address(
            ip.split("%", 1)[0]
        )  # a zone id ("fe80::1%eth0") never makes it public
    except ValueError:
        return False
    return _judge(address, allow_private=allow_private)


def _judge(address: IPAddress, *, allow_private: bool) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return _judge(embedded, allow_private=allow_private)
        never: tuple[_V4, ...] | tuple[_V6, ...] = _NEVER_V6
        private: tuple[_V4, ...] | tuple[_V6, ...] = _PRIVATE_V6
    else:
        never, private = _NEVER_V4, _PRIVATE_V4
    if any(address in net for net in never):
        return False
    # Belt and braces: whatever the standard library knows to be unroutable is refused even if our table
    # missed it (::/8 IPv4-compatible addresses, for one, are "reserved").
    if address.is_loopback:
        return allow_private
    if address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved:
        return False
    if any(address in net for net in private):
        return allow_private
    if address.is_private or not address.is_global:
        return allow_private
    return True


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    return None


def parse_base_url(url: str, *, allow_private: bool) -> BaseURL:
    """Split and check a provider base URL: ``http(s)://host[:port][/prefix]``, nothing else.

    Error handling: raises :class:`~trioproxy.errors.ValidationError` with a reason that quotes no part of the
    URL beyond its scheme and host (a pasted URL can carry credentials).
    """
    if not url or any(not 0x21 <= ord(char) <= 0x7E for char in url):
        raise ValidationError(
            "the base URL must be non-empty printable ASCII without spaces (use punycode hosts)"
        )
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ValidationError("the base URL must start with http:// or https://")
    if "?" in rest or "#" in rest:
        raise ValidationError("the base URL must not have a query string or a fragment")
    if "\\" in rest:
        raise ValidationError("the base URL must not contain a backslash")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise ValidationError(
            "the base URL must not contain credentials (user@host): store the key as a provider key"
        )
    host, port = _split_authority(authority, default_port=_SCHEMES[scheme])
    _check_host(host, allow_private=allow_private)
    prefix = _check_prefix(slash + path)
    return BaseURL(origin=Origin(scheme=scheme, host=host, port=port), path_prefix=prefix)


def _split_authority(authority: str, *, default_port: int) -> tuple[str, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValidationError("the base URL has an unterminated IPv6 literal")
        host, after = authority[1:end], authority[end + 1 :]
        if after and not after.startswith(":"):
            raise ValidationError("the base URL has text after its IPv6 literal")
        port_text = after[1:] if after else None
        if "%" in host:
            raise ValidationError("the base URL must not use an IPv6 zone id")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValidationError("the base URL has an invalid IPv6 literal") from None
    else:
        host, colon, port_text_raw = authority.partition(":")
        port_text = port_text_raw if colon else None
    if not host:
        raise ValidationError("the base URL has no host")
    if port_text is None:
        return host.lower(), default_port
    if not port_text.isdigit() or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
        raise ValidationError("the base URL's port must be a number from 1 to 65535")
    return host.lower(), int(port_text)


def _check_host(host: str, *, allow_private: bool) -> None:
    literal = _ip_literal(host)
    if literal is not None:
        if not _judge(literal, allow_private=allow_private):
            raise ValidationError(
                f"the base URL's address {host} is not allowed (private, link-local or reserved)"
            )
        return
    if len(host) > _MAX_HOST or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValidationError("the base URL's host is not a valid host name")
    if host in _METADATA_NAMES:
        raise ValidationError(f"the base URL's host {host} is a cloud metadata service")
    is_local = host in _LOCAL_NAMES or host.endswith(".localhost")
    if is_local and not allow_private:
        raise ValidationError(f"the base URL's host {host} is local; enable private upstreams to use it")


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host denotes by itself, or None for a name that needs DNS.

    Resolvers still accept the inet_aton forms (``2852039166``, ``0xA9FEA9FE``, ``0251.0376.0251.0376``,
    ``127.1``) that all mean an IPv4 address; WHATWG URL parsing treats a host whose last label is numeric as
    IPv4. We accept only the canonical dotted quad and refuse every other numeric-looking host outright.
    """
    if ":" in host:
        return ipaddress.IPv6Address(host)  # validated by _split_authority
    last = host.rstrip(".").rsplit(".", 1)[-1]
    looks_numeric = bool(last) and (last.isdigit() or last.startswith("0x"))
    if not looks_numeric:
        return None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        raise ValidationError(
            "the base URL's host looks numeric but is not a dotted-quad IPv4 address"
        ) from None


def _check_prefix(path: str) -> str:
    prefix = path.rstrip("/")
    if not prefix:
        return ""
    segments = prefix.split("/")[1:]
    for segment in segments:
        if segment in ("", ".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
            raise ValidationError(
                "the base URL's path must be plain segments of letters, digits, '.', '_', '~' and '-'"
            )
    return prefix
