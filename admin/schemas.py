"""Request and response models of the admin API (pydantic 2, documented by quart-schema).

Request models forbid unknown fields (``extra="forbid"``): a body that tries to set ``role``, ``owner_id``,
``budget`` or ``key_hash`` where they are not offered is refused with 422 instead of being silently ignored or,
worse, applied. Every string and list has a length bound (OWASP API4). Response models are allowlists in the other
direction: a field not declared here never reaches a client, whatever the service layer returned, and there is no
field for a secret, a ciphertext or a key hash anywhere (the one exception is the new gateway key, ``key``, in
:class:`GatewayKeyCreatedOut`).

PATCH models have only optional fields; the routes pass on exactly the fields the client sent
(``model_fields_set``), so ``null`` clears a value and an absent field keeps it.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from trioproxy.store.users import MAX_PASSWORD, MIN_PASSWORD
from trioproxy.store.validation import MAX_HEADERS, MAX_MODELS, MAX_NAME, MAX_SECRET

T = TypeVar("T")


# Bodies are JSON, and their values are taken as the JSON types the schema names: no "5" for 5, no 0 for false,
# no 1.5e9 for a date. Query strings (Query models) stay lax: everything in a URL is text.
def _json_number(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


def _json_text(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an ISO-8601 string with a time zone")
    return value


def _decimal_text(pattern: str, example: str) -> Any:
    compiled = re.compile(pattern)

    def check(value: Any) -> Any:
        # Money never travels through a binary float: decimal strings, or whole numbers.
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"send amounts as decimal strings such as {example!r}")
        if isinstance(value, str) and not compiled.fullmatch(value):
            raise ValueError(f"send amounts as decimal strings such as {example!r}")
        return value

    return check


_MONEY_TEXT = r"[0-9]{1,12}(\.[0-9]{1,6})?"
_PRICE_TEXT = r"[0-9]{1,10}(\.[0-9]{1,10})?"


def _amount_schema(pattern: str, maximum: int) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": f"^{pattern}$"},
                {"type": "integer", "minimum": 0, "maximum": maximum},
            ]
        }
    )


# Constraints come before the validator, so pydantic still writes them into the JSON schema.
_NUMBER = BeforeValidator(_json_number)
# Names: no control characters (log and terminal injection), as the service layer checks too.
_CONTROLS = r"\u0000-\u001f\u007f-\u009f\u2028\u2029"
_NO_CONTROLS = rf"^[^{_CONTROLS}]*[^\s{_CONTROLS}][^{_CONTROLS}]*$"

Bool = StrictBool
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=_NO_CONTROLS)]
Id = Annotated[int, Field(ge=1, le=2**31 - 1), _NUMBER]
Count = Annotated[int, Field(ge=1, le=2**53), _NUMBER]
Weight = Annotated[int, Field(ge=0, le=1_000_000), _NUMBER]
Seconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False), _NUMBER]
QueryId = Annotated[int, Field(ge=1, le=2**31 - 1)]
Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=18, decimal_places=6),
    BeforeValidator(_decimal_text(_MONEY_TEXT, "12.50")),
    _amount_schema(_MONEY_TEXT, 10**12 - 1),
]
Price = Annotated[
    Decimal,
    Field(ge=0, max_digits=20, decimal_places=10),
    BeforeValidator(_decimal_text(_PRICE_TEXT, "0.15")),
    _amount_schema(_PRICE_TEXT, 10**10 - 1),
]
Instant = Annotated[AwareDatetime, BeforeValidator(_json_text)]
Kind = Literal["openai", "anthropic", "gemini"]
RoleName = Literal["super_admin", "admin", "operator", "user", "read_only", "api_only"]
BudgetPeriod = Literal["daily", "weekly", "monthly"]
Password = Annotated[str, Field(min_length=1, max_length=1024)]
NewPassword = Annotated[str, Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]
Username = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$")]
Email = Annotated[str, Field(max_length=320, pattern=r"^[^@\s]{1,64}@[^@\s]{1,255}$")]
# Secrets go into a header verbatim: printable ASCII without spaces, as every provider issues them.
Secret = Annotated[str, Field(min_length=1, max_length=MAX_SECRET, pattern=r"^[\x21-\x7e]+$")]
# In a PATCH body, a field that cannot be cleared may be left out but not sent as null (the schema says so; the
# service layer refuses a null that gets through).
NotNull = SkipJsonSchema[None]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def sent(self) -> dict[str, Any]:
        """The fields the client actually sent (``null`` included): what a PATCH changes."""
        return self.model_dump(include=self.model_fields_set)


class Output(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Query(BaseModel):
    # Query strings: unknown parameters are ignored (cache busters); bounds still hold.
    model_config = ConfigDict(extra="ignore")


# --- common -------------------------------------------------------------------------------------------------


class ErrorDetail(Output):
    code: str
    message: str


class ErrorOut(Output):
    error: ErrorDetail


class NoContent(Output):
    """No content (204)."""


class Page(Output, Generic[T]):
    items: list[T]
    total: int
    page: int
    page_size: int


# --- auth and users -----------------------------------------------------------------------------------------


class LoginIn(Input):
    username: Annotated[str, Field(min_length=1, max_length=100)]
    password: Password


class RefreshIn(Input):
    refresh_token: Annotated[str, Field(min_length=1, max_length=4096)]


class PasswordChangeIn(Input):
    current_password: Password
    new_password: NewPassword


class UserOut(Output):
    id: int
    username: str
    email: str | None
    role: str
    enabled: bool
    budget: Decimal | None = None
    budget_period: str | None = None
    has_password: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class TokenOut(Output):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int
    user: UserOut


class MeOut(Output):
    user: UserOut
    permissions: list[str]


class UserCreateIn(Input):
    username: Username
    # Without a password the account cannot log in (an api_only owner of gateway keys, say).
    password: NewPassword | None = None
    email: Email | None = None
    role: RoleName = "user"
    enabled: Bool = True
    budget: Money | None = None
    budget_period: BudgetPeriod | None = None


class UserUpdateIn(Input):
    username: Username | NotNull = None
    password: NewPassword | NotNull = None
    email: Email | None = None
    role: RoleName | NotNull = None
    enabled: Bool | NotNull = None
    budget: Money | None = None
    budget_period: BudgetPeriod | None = None


class PageQuery(Query):
    page: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    # Larger requests are clamped to the cap, not refused (see admin.pagination).
    page_size: Annotated[int, Field(ge=1, le=1_000_000)] = 50


class UserQuery(PageQuery):
    role: RoleName | None = None
    enabled: bool | None = None
    search: Annotated[str, Field(max_length=100)] | None = None


class PermissionOut(Output):
    name: str
    description: str


class RoleOut(Output):
    name: str
    description: str
    permissions: list[str]


class RolesOut(Output):
    roles: list[RoleOut]
    permissions: list[PermissionOut]


# --- providers ----------------------------------------------------------------------------------------------


class Timeouts(BaseModel):
    """Per-provider timeouts in seconds; ``null`` keeps the gateway's default."""

    model_config = ConfigDict(extra="forbid")
    connect: Seconds | None = None
    first_byte: Seconds | None = None
    idle: Seconds | None = None
    total: Seconds | None = None


Headers = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=100)], Annotated[str, Field(max_length=4096)]],
    Field(max_length=MAX_HEADERS),
]
BaseUrl = Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#@\s]+")]


class ProviderCreateIn(Input):
    name: Name
    kind: Kind
    base_url: BaseUrl
    headers: Headers = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    enabled: Bool = True


class ProviderUpdateIn(Input):
    name: Name | NotNull = None
    base_url: BaseUrl | NotNull = None
    headers: Headers | NotNull = None
    # null restores every default
    timeouts: Timeouts | None = None
    enabled: Bool | NotNull = None


class ProviderOut(Output):
    id: int
    name: str
    kind: str
    base_url: str
    headers: dict[str, str]
    timeouts: Timeouts
    enabled: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class ProviderQuery(PageQuery):
    kind: Kind | None = None
    enabled: bool | None = None


# --- provider keys ------------------------------------------------------------------------------------------


class ProviderKeyCreateIn(Input):
    provider_id: Id
    name: Name
    secret: Secret
    weight: Weight = 1
    enabled: Bool = True
    rpm_limit: Count | None = None
    tpm_limit: Count | None = None
    rpd_limit: Count | None = None
    # Administrators only: another user's id, or null for a key shared with every user. Omitted: the caller.
    owner_id: Id | None = None


class ProviderKeyUpdateIn(Input):
    name: Name | NotNull = None
    secret: Secret | NotNull = None
    weight: Weight | NotNull = None
    enabled: Bool | NotNull = None
    rpm_limit: Count | None = None
    tpm_limit: Count | None = None
    rpd_limit: Count | None = None


class ProviderKeyOut(Output):
    id: int
    name: str
    provider_id: int
    provider: str
    owner_id: int | None
    secret_hint: str
    weight: int
    enabled: bool
    state: str
    rpm_limit: int | None
    tpm_limit: int | None
    rpd_limit: int | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ProviderKeyQuery(PageQuery):
    provider_id: QueryId | None = None
    owner_id: QueryId | None = None
    enabled: bool | None = None


class ProbeOut(Output):
    ok: bool
    status: int | None
    latency_ms: float
    model_count: int | None
    error: str | None


# --- gateway keys -------------------------------------------------------------------------------------------


class _GatewayKeyLimits(Input):
    # Administrators only (manage_all_tenants): a user must not lift the limits it was given.
    rpm_limit: Count | None = None
    tpm_limit: Count | None = None
    rpd_limit: Count | None = None
    daily_token_limit: Count | None = None
    daily_cost_limit: Money | None = None
    budget: Money | None = None
    budget_period: BudgetPeriod | None = None
    max_concurrency: Annotated[int, Field(ge=1, le=100_000), _NUMBER] | None = None


Models = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=255, pattern=_NO_CONTROLS)]],
    Field(min_length=1, max_length=MAX_MODELS),
]
Pool = Annotated[list[Id], Field(max_length=1000)]
Strategy = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Retries = Annotated[int, Field(ge=0, le=10), _NUMBER]


class GatewayKeyCreateIn(_GatewayKeyLimits):
    name: Name
    provider_id: Id
    # Omitted: every key of the provider the owner may use (its own and shared ones).
    provider_key_ids: Pool | None = None
    strategy: Strategy = "round_robin"
    retry_count: Retries = 0
    first_byte_timeout: Seconds | None = None
    total_timeout: Seconds | None = None
    allowed_models: Models | None = None
    expires_at: Instant | None = None
    enabled: Bool = True
    # Administrators only: the user the key belongs to, or null for a system key. Omitted: the caller.
    owner_id: Id | None = None


class GatewayKeyUpdateIn(_GatewayKeyLimits):
    name: Name | NotNull = None
    # null: every key of the provider the owner may use
    provider_key_ids: Pool | None = None
    strategy: Strategy | NotNull = None
    retry_count: Retries | NotNull = None
    first_byte_timeout: Seconds | None = None
    total_timeout: Seconds | None = None
    allowed_models: Models | None = None
    expires_at: Instant | None = None
    enabled: Bool | NotNull = None


class GatewayKeyOut(Output):
    id: int
    name: str
    prefix: str
    provider_id: int
    provider: str
    owner_id: int | None
    provider_key_ids: list[int]
    provider_keys: list[str]
    strategy: str
    retry_count: int
    first_byte_timeout: float | None
    total_timeout: float | None
    rpm_limit: int | None
    tpm_limit: int | None
    rpd_limit: int | None
    daily_token_limit: int | None
    daily_cost_limit: Decimal | None
    budget: Decimal | None
    budget_period: str | None
    max_concurrency: int | None
    allowed_models: list[str] | None
    expires_at: dt.datetime | None
    enabled: bool
    last_used_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class GatewayKeyCreatedOut(GatewayKeyOut):
    key: str = Field(description="the full gateway key: shown in this answer only, never again")


class GatewayKeyQuery(PageQuery):
    provider_id: QueryId | None = None
    owner_id: QueryId | None = None
    enabled: bool | None = None


# --- prices -------------------------------------------------------------------------------------------------


class PriceTierModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_input_tokens: Annotated[int, Field(ge=0, le=2**53), _NUMBER]
    input_per_million: Price
    output_per_million: Price
    cache_read_per_million: Price | None = None
    cache_write_per_million: Price | None = None


Tiers = Annotated[list[PriceTierModel], Field(max_length=20)]
ModelName = Annotated[str, Field(min_length=1, max_length=255, pattern=_NO_CONTROLS)]


class PriceCreateIn(Input):
    provider_kind: Kind
    model: ModelName
    input_per_million: Price
    output_per_million: Price
    cache_read_per_million: Price | None = None
    cache_write_per_million: Price | None = None
    tiers: Tiers = Field(default_factory=list)


class PriceUpdateIn(Input):
    input_per_million: Price | NotNull = None
    output_per_million: Price | NotNull = None
    cache_read_per_million: Price | None = None
    cache_write_per_million: Price | None = None
    tiers: Tiers | NotNull = None


class PriceOut(Output):
    id: int
    provider_kind: str
    model: str
    input_per_million: Decimal
    output_per_million: Decimal
    cache_read_per_million: Decimal | None
    cache_write_per_million: Decimal | None
    tiers: list[PriceTierModel]
    updated_at: dt.datetime


class PriceQuery(PageQuery):
    provider_kind: Kind | None = None
    search: Annotated[str, Field(max_length=255)] | None = None
