"""Input checks and JSON views shared by every configuration writer (CLI and admin API alike).

The admin API validates shapes with pydantic first; these checks are the rules that hold whoever calls the
service layer: name lengths, header safety, secret alphabet, positive timeouts. Each raises
:class:`~trioproxy.errors.ValidationError` with a message that never contains the value it refused when that
value may be a secret.

The JSON views are allowlists, not denylists: a column added later (a secret, say) stays private until someone
lists it here.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from trioproxy.errors import ValidationError
from trioproxy.snapshot import ProviderKind
from trioproxy.store.models import GatewayKey, Provider, ProviderKey, User

MAX_NAME = 100
MAX_SECRET = 4096
MAX_MODELS = 1000
MAX_HEADERS = 50
# RFC 9110 token: what a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STRATEGY = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Headers the proxy owns: framing, routing, and the credentials it injects from provider keys (a credential
# stored here would be shown in plain text by every provider listing).
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "authorization",
        "x-api-key",
        "x-goog-api-key",
        "api-key",
        "cookie",
    }
)


def has_controls(value: str) -> bool:
    """Control characters, lone surrogates or line separators: what would let a name forge log lines or
    terminal output."""
    return any(unicodedata.category(char) in ("Cc", "Cs") or char in "\u2028\u2029" for char in value)


def name(value: str, what: str = "name", *, max_length: int = MAX_NAME) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"the {what} must be a string")
    value = value.strip()
    if not value or len(value) > max_length or has_controls(value):
        raise ValidationError(f"the {what} must be 1 to {max_length} characters without control characters")
    return value


def kind(value: str) -> ProviderKind:
    try:
        return ProviderKind(value.strip().lower())
    except (ValueError, AttributeError):
        kinds = ", ".join(k.value for k in ProviderKind)
        raise ValidationError(f"the provider kind must be one of {kinds}") from None


def timeout(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError(f"{what} must be a positive number of seconds")
    return float(value)


def count(value: int | None, what: str, *, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValidationError(f"{what} must be an integer >= {minimum}")
    return value


def required_count(value: int, what: str, *, minimum: int = 0) -> int:
    checked = count(value, what, minimum=minimum)
    if checked is None:
        raise ValidationError(f"{what} must be an integer >= {minimum}")
    return checked


def money(value: Decimal | None, what: str) -> Decimal | None:
    if value is None:
        return None
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        raise ValidationError(f"{what} must be a finite amount >= 0")
    return value


def headers(raw: Mapping[str, str] | None) -> dict[str, str]:
    clean: dict[str, str] = {}
    if raw is not None and len(raw) > MAX_HEADERS:
        raise ValidationError(f"a provider may set at most {MAX_HEADERS} headers")
    for header, value in (raw or {}).items():
        if not isinstance(header, str) or not isinstance(value, str) or not _TOKEN.fullmatch(header):
            raise ValidationError("header names must be HTTP tokens and values strings")
        if header.lower() in _RESERVED_HEADERS:
            raise ValidationError(f"the header {header} is set by the gateway and cannot be configured")
        # CR, LF or NUL would let a value start a new header (request splitting); the proxy also refuses
        # anything outside printable ASCII when it builds the upstream request.
        if (
            not value.isascii()
            or any(not 0x20 <= ord(char) <= 0x7E for char in value)
            or value != value.strip()
        ):
            raise ValidationError(
                f"the value of header {header} must be printable ASCII without outer spaces"
            )
        clean[header] = value
    return clean


def secret(value: str) -> str:
    # The secret goes into a header verbatim: printable ASCII without spaces is all any provider issues.
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_SECRET
        or any(not 0x21 <= ord(char) <= 0x7E for char in value)
    ):
        raise ValidationError("the secret must be non-empty printable ASCII without spaces")
    return value


def aware(value: dt.datetime | None, what: str) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValidationError(f"{what} must carry a time zone")
    return value.astimezone(dt.UTC)


def models(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    clean = [name(model, "model name", max_length=255) for model in values]
    if not clean or len(clean) > MAX_MODELS:
        raise ValidationError(f"allowed models must list 1 to {MAX_MODELS} models (or be omitted for any)")
    return list(dict.fromkeys(clean))


BUDGET_PERIODS = ("daily", "weekly", "monthly")


def budget_period(value: str | None) -> str | None:
    """``daily``, ``weekly``, ``monthly``, or ``None`` for a budget that never resets."""
    if value is not None and value not in BUDGET_PERIODS:
        raise ValidationError(
            f"budget_period must be one of {', '.join(BUDGET_PERIODS)} (or null for lifetime)"
        )
    return value


def strategy(value: str) -> str:
    if not isinstance(value, str):
        raise ValidationError("the strategy must be a string")
    value = value.strip()
    if not _STRATEGY.fullmatch(value):
        raise ValidationError("the strategy must be a lower-case identifier such as round_robin")
    return value


# --- JSON views ---------------------------------------------------------------------------------------------


def _fields(names: str) -> tuple[str, ...]:
    return tuple(names.split())


USER_FIELDS = _fields("id username email role enabled budget budget_period created_at updated_at")
PROVIDER_FIELDS = _fields(
    """id name kind base_url headers connect_timeout first_byte_timeout idle_timeout total_timeout enabled
    created_at updated_at"""
)
PROVIDER_KEY_FIELDS = _fields(
    """id name provider_id owner_id secret_hint weight enabled state rpm_limit tpm_limit rpd_limit created_at
    updated_at"""
)
GATEWAY_KEY_FIELDS = _fields(
    """id name key_prefix provider_id owner_id strategy retry_count first_byte_timeout total_timeout rpm_limit
    tpm_limit rpd_limit daily_token_limit daily_cost_limit budget budget_period max_concurrency allowed_models
    expires_at enabled last_used_at created_at updated_at"""
)


def json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


def pick(row: Any, fields: Sequence[str]) -> dict[str, Any]:
    return {field: json_value(getattr(row, field)) for field in fields}


def user_to_json(user: User) -> dict[str, Any]:
    return {**pick(user, USER_FIELDS), "has_password": user.password_hash is not None}


def provider_to_json(provider: Provider) -> dict[str, Any]:
    return pick(provider, PROVIDER_FIELDS)


def provider_key_to_json(key: ProviderKey, provider_name: str) -> dict[str, Any]:
    return {**pick(key, PROVIDER_KEY_FIELDS), "provider": provider_name}


def gateway_key_to_json(
    key: GatewayKey, provider_name: str, pool_names: Sequence[str], pool_ids: Sequence[int] = ()
) -> dict[str, Any]:
    view = pick(key, GATEWAY_KEY_FIELDS)
    view["prefix"] = view.pop("key_prefix")
    return {
        **view,
        "provider": provider_name,
        "provider_keys": list(pool_names),
        "provider_key_ids": list(pool_ids),
    }
