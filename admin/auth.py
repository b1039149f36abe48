"""Authentication of the admin API: JWTs, login throttling, the bootstrap administrator.

Tokens (RFC 8725's advice, and the origin system's holes closed):

* PyJWT with the algorithm pinned to HS256 (``algorithms=["HS256"]``; ``alg: none`` and algorithm switches are
  refused) under a 256-bit key derived from the master key (HKDF, its own label), so every instance sharing the
  master key accepts the same tokens;
* required claims ``exp iat sub iss aud jti typ ver``; ``typ`` is ``access`` or ``refresh`` and each is accepted
  only where it belongs: a refresh token never works as an access token (the origin's refresh tokens did);
* revocation: ``ver`` is the user's ``token_version`` when the token was issued; every request re-reads the user,
  so a password change, a role change, disabling or "log out" (which bumps the version) kills every older token,
  and a deleted or disabled user's token dies with the account;
* access tokens live 15 minutes, refresh tokens 7 days; 30 s leeway for clock skew between instances.

Login throttling (NIST SP 800-63B 5.2.2, OWASP): :class:`LoginThrottle` is sans-IO (the caller passes the time).
Per account: 5 failures in 15 minutes are free, then each further failure doubles a lockout (1 s, 2 s, ... capped at
15 minutes); 100 consecutive failures lock the account until an administrator unlocks it. Per client address:
20 attempts a minute. Unknown usernames are tracked exactly like real ones and the unknown-user path verifies a
dummy argon2 hash, so neither the answers (401 ``invalid username or password``, or 429) nor their timing tell an
attacker which usernames exist. The state lives in the process (one admin plane per deployment); it is bounded.
"""

from __future__ import annotations

import collections
import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from admin.errors import too_many_requests, unauthorized
from trioproxy.crypto import load_or_create_master_key
from trioproxy.roles import Permission, permissions_of
from trioproxy.settings import Settings
from trioproxy.store.actor import Actor
from trioproxy.store.users import (
    AuthUser,
    ensure_bootstrap_admin,
    find_for_login,
    get_auth_user,
    record_login,
    verify_password,
)

if TYPE_CHECKING:
    from admin.state import AdminState

ALGORITHM = "HS256"
ISSUER = "trioproxy"
AUDIENCE = "trioproxy-admin"
ACCESS_TTL = 15 * 60
REFRESH_TTL = 7 * 24 * 3600
LEEWAY = 30
MAX_TOKEN_BYTES = 4096
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud", "jti", "typ"]
_HKDF_SALT = b"trioproxy admin jwt"
_HKDF_INFO = b"trioproxy/admin-jwt/hs256/v1"
INVALID_LOGIN = "invalid username or password"


def jwt_key_from_master(master_key: bytes) -> bytes:
    """The HS256 key: HKDF-SHA256 of the master key under a label of its own (never the AES key itself)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO).derive(master_key)


def jwt_key_for(settings: Settings) -> bytes:
    """Blocking (reads the master key file): the HS256 key of this deployment."""
    return jwt_key_from_master(load_or_create_master_key(settings))


class TokenKind(enum.StrEnum):
    ACCESS = "access"
    REFRESH = "refresh"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: int
    version: int
    kind: TokenKind
    jti: str


class TokenService:
    """Issues and checks the admin API's JWTs (pure: the clock is injectable for tests)."""

    def __init__(
        self,
        key: bytes,
        *,
        access_ttl: int = ACCESS_TTL,
        refresh_ttl: int = REFRESH_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 32:
            raise ValueError("the JWT key must have at least 256 bits")
        self._key = key
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self._clock = clock

    def __repr__(self) -> str:
        return f"TokenService({ALGORITHM}, access_ttl={self.access_ttl})"

    def issue(self, user_id: int, token_version: int, kind: TokenKind) -> str:
        now = int(self._clock())
        ttl = self.access_ttl if kind is TokenKind.ACCESS else self.refresh_ttl
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": str(user_id),
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_hex(16),
            "typ": kind.value,
            "ver": token_version,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def pair(self, user: AuthUser) -> dict[str, Any]:
        return {
            "access_token": self.issue(user.id, user.token_version, TokenKind.ACCESS),
            "refresh_token": self.issue(user.id, user.token_version, TokenKind.REFRESH),
            "token_type": "bearer",
            "expires_in": self.access_ttl,
        }

    def decode(self, token: str, expected: TokenKind) -> TokenClaims:
        """The claims of a valid token of kind ``expected``; every failure is the same 401."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise unauthorized()
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError:
            raise unauthorized() from None
        # Only iat/exp are checked by the clock; a token from the future is forged or from a broken clock.
        sub, version, kind, iat = claims.get("sub"), claims.get("ver"), claims.get("typ"), claims.get("iat")
        if (
            kind != expected.value
            or not isinstance(sub, str)
            or not sub.isdigit()
            or not isinstance(version, int)
            or isinstance(version, bool)
            or not isinstance(iat, int | float)
            or iat > self._clock() + LEEWAY
        ):
            raise unauthorized()
        return TokenClaims(user_id=int(sub), version=version, kind=expected, jti=str(claims["jti"]))


# --- throttling ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThrottleRules:
    free_failures: int = 5  # per account, within `window`
    window: float = 15 * 60.0  # failures older than this (with nothing since) are forgotten
    max_delay: float = 15 * 60.0
    hard_cap: int = 100  # NIST SP 800-63B: at most 100 consecutive failures, then a human unlocks
    ip_attempts: int = 20  # per client address, within `ip_window`
    ip_window: float = 60.0
    max_tracked: int = 10_000  # accounts and addresses remembered (oldest forgotten first)


@dataclass(slots=True)
class _Account:
    failures: int = 0
    last_failure: float = 0.0


@dataclass(slots=True)
class LoginThrottle:
    """Failure counting and lockouts for logins, per account and per client address (sans-IO)."""

    rules: ThrottleRules = field(default_factory=ThrottleRules)
    _accounts: collections.OrderedDict[str, _Account] = field(default_factory=collections.OrderedDict)
    _addresses: collections.OrderedDict[str, collections.deque[float]] = field(
        default_factory=collections.OrderedDict
    )

    @staticmethod
    def account_key(username: str) -> str:
        return username.strip().lower()

    def _account(self, username: str, now: float) -> _Account | None:
        state = self._accounts.get(self.account_key(username))
        if state is None:
            return None
        if state.failures < self.rules.hard_cap and now - state.last_failure > self.rules.window:
            del self._accounts[self.account_key(username)]
            return None
        return state

    def wait_time(self, username: str, ip: str, now: float) -> float:
        """Seconds until a login for ``username`` from ``ip`` may be tried; 0 when it may be tried now."""
        waits = [0.0]
        state = self._account(username, now)
        if state is not None:
            if state.failures >= self.rules.hard_cap:
                waits.append(self.rules.max_delay)
            elif state.failures >= self.rules.free_failures:
                delay = min(self.rules.max_delay, 2.0 ** (state.failures - self.rules.free_failures))
                waits.append(state.last_failure + delay - now)
        attempts = self._addresses.get(ip)
        if attempts is not None:
            while attempts and now - attempts[0] >= self.rules.ip_window:
                attempts.popleft()
            if len(attempts) >= self.rules.ip_attempts:
                waits.append(attempts[0] + self.rules.ip_window - now)
        return max(waits)

    def attempt(self, ip: str, now: float) -> None:
        """Count one login attempt from ``ip`` (whatever its outcome)."""
        attempts = self._addresses.pop(ip, None) or collections.deque(maxlen=self.rules.ip_attempts)
        attempts.append(now)
        self._addresses[ip] = attempts
        while len(self._addresses) > self.rules.max_tracked:
            self._addresses.popitem(last=False)

    def failure(self, username: str, now: float) -> None:
        key = self.account_key(username)
        state = self._account(username, now) or _Account()
        self._accounts.pop(key, None)
        state.failures += 1
        state.last_failure = now
        self._accounts[key] = state
        while len(self._accounts) > self.rules.max_tracked:
            self._accounts.popitem(last=False)

    def success(self, username: str) -> None:
        self._accounts.pop(self.account_key(username), None)

    def unlock(self, username: str) -> None:
        """An administrator's unlock (also what a password reset by an administrator does)."""
        self._accounts.pop(self.account_key(username), None)

    def failures(self, username: str, now: float) -> int:
        state = self._account(username, now)
        return 0 if state is None else state.failures


# --- the flows ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: int
    username: str
    role: str
    permissions: frozenset[Permission]

    def actor(self, ip: str | None) -> Actor:
        return Actor(user_id=self.user_id, name=self.username, permissions=self.permissions, ip=ip)


def bearer_token(header: str | None) -> str:
    if header is None:
        raise unauthorized("authentication required: send Authorization: Bearer <access token>")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("authentication required: send Authorization: Bearer <access token>")
    return token.strip()


async def authenticate(state: AdminState, header: str | None) -> Principal:
    """The principal of a bearer access token: the token must be valid and its user exist, be enabled and
    still be on the token's version."""
    claims = state.tokens.decode(bearer_token(header), TokenKind.ACCESS)
    user = await state.db(get_auth_user, state.engine, claims.user_id)
    if user is None or not user.enabled or user.token_version != claims.version:
        raise unauthorized()
    return Principal(user.id, user.username, user.role, permissions_of(user.role))


async def login(state: AdminState, username: str, password: str, ip: str) -> tuple[AuthUser, dict[str, Any]]:
    """Check a username and password under the throttle; the user and a fresh token pair on success."""
    now = trio.current_time()
    wait = state.throttle.wait_time(username, ip, now)
    if wait > 0:
        raise too_many_requests(wait)
    state.throttle.attempt(ip, now)
    user = await state.db(find_for_login, state.engine, username)
    valid = await state.cpu(verify_password, None if user is None else user.password_hash, password)
    if user is None or not valid or not user.enabled:
        state.throttle.failure(username, trio.current_time())
        raise unauthorized(INVALID_LOGIN)
    state.throttle.success(username)
    principal = Principal(user.id, user.username, user.role, permissions_of(user.role))
    await state.db(record_login, state.engine, user.id, actor=principal.actor(ip), password=password)
    return user, state.tokens.pair(user)


async def refresh(state: AdminState, refresh_token: str) -> tuple[AuthUser, dict[str, Any]]:
    """A new token pair for a valid refresh token whose user is still enabled and on the same version."""
    claims = state.tokens.decode(refresh_token, TokenKind.REFRESH)
    user = await state.db(get_auth_user, state.engine, claims.user_id)
    if user is None or not user.enabled or user.token_version != claims.version:
        raise unauthorized()
    return user, state.tokens.pair(user)


async def bootstrap_admin(state: AdminState, announce: Callable[[str], None]) -> None:
    """First start with no users: create ``admin``; a generated password is announced once (not logged)."""
    generated = await state.db(ensure_bootstrap_admin, state.engine, state.settings.admin_password)
    if generated is not None:
        announce(
            "trioproxy: created the administrator account 'admin' with the password "
            f"{generated} (shown once; change it with POST /api/auth/password)"
        )
