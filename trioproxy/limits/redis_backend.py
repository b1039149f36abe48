"""The shared backend: the same plans as :mod:`trioproxy.limits.local`, executed by Lua scripts in Redis.

Every decision is one ``EVALSHA`` of :data:`RESERVE_LUA`: it sweeps what expired, checks every limit of the plan,
and reserves on all of them only when all pass, atomically (Redis runs one script at a time), so any number of
gateway instances share exact limits. Settling is one ``EVALSHA`` of :data:`SETTLE_LUA`, made idempotent by a
per-reservation marker (a settle retried after a lost reply counts once).

Keyspace (``P`` is the configured prefix, ``K`` a check's logical key such as ``gk:7:rpm``):

* window: ``P:K`` sorted set of ``rid:amount`` scored by arrival time, ``P:K:sum`` their total;
* counter: ``P:K`` integer (spend of the period, reservations included), ``P:K:resv`` sorted set of open
  reservations ``rid:amount`` scored by lease end; swept into the counter when the lease ends unsettled;
* gauge: ``P:K`` sorted set of request ids scored by lease end;
* ``P:settled:rid`` marks a settled reservation until its lease would have ended.

Every key has a TTL except lifetime budgets. Counters are a cache of the database ledger: a counter that is
missing (first use, a new period, a restarted Redis) makes the script answer "seed me", the caller sums the
``requests`` table and stores the result with ``SET NX``, then asks again.

Numbers: amounts travel as decimal strings and are added with INCRBY/DECRBY; scores are passed as Python
``repr`` strings, never formatted by Lua (whose ``tostring`` keeps only 14 digits).

Resource handling: :meth:`RedisBackend.open` owns the coredis client (which must run as an async context
manager); the caller bounds each call with its own deadline. Error handling: coredis errors, ``OSError`` and
timeouts propagate to the caller, whose policy decides (see :mod:`trioproxy.limits.policy`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import coredis.exceptions
import trio

from trioproxy.limits.model import (
    KEY_GRACE,
    RATE_WINDOW,
    Answer,
    Check,
    CheckKind,
    CheckResult,
    NeedsSeed,
    Plan,
    Reservation,
    settled_amount,
)
from trioproxy.redis_client import redis_client

# ARGV: now, rid, lease_until, n, then 5 per check: kind, limit, amount, a, b. KEYS: 2 per check.
#   W: a = cutoff (now - window), b = ttl;  C: a = '1' if it settles, b = ttl of the reservation set;
#   G: a = ttl.
# Reply: {1, results} admitted, {0, results} refused, {2, missing indices (1-based)} seed first.
# results: per check {ok, used, retry, newest}: W retry = arrival time of the entry whose expiry makes room,
# newest = the newest arrival; C retry = 'soon' when only open reservations are in the way.
RESERVE_LUA = """
local now, rid, lease_until = ARGV[1], ARGV[2], ARGV[3]
local n = tonumber(ARGV[4])
local function amount_of(member)
  return tonumber(string.match(member, ':(%d+)$'))
end
local missing = {}
for i = 1, n do
  if ARGV[4 + (i - 1) * 5 + 1] == 'C' and redis.call('EXISTS', KEYS[2 * i - 1]) == 0 then
    missing[#missing + 1] = i
  end
end
if #missing > 0 then
  return {2, missing}
end
local all_ok = 1
local results = {}
for i = 1, n do
  local base = 4 + (i - 1) * 5
  local kind, limit, amount = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local k1, k2 = KEYS[2 * i - 1], KEYS[2 * i]
  local used, ok, retry, newest = 0, 1, '', ''
  if kind == 'W' then
    local cutoff = ARGV[base + 4]
    local expired = redis.call('ZRANGEBYSCORE', k1, '-inf', cutoff)
    if #expired > 0 then
      local drop = 0
      for _, m in ipairs(expired) do drop = drop + amount_of(m) end
      redis.call('ZREMRANGEBYSCORE', k1, '-inf', cutoff)
      redis.call('DECRBY', k2, drop)
    end
    used = tonumber(redis.call('GET', k2) or '0')
    local last = redis.call('ZRANGE', k1, -1, -1, 'WITHSCORES')
    if #last > 0 then newest = last[2] end
    if used + amount > limit then
      ok = 0
      if amount <= limit then
        local entries = redis.call('ZRANGE', k1, 0, -1, 'WITHSCORES')
        local left = used
        for j = 1, #entries, 2 do
          left = left - amount_of(entries[j])
          if left + amount <= limit then retry = entries[j + 1]; break end
        end
      end
    end
  elseif kind == 'C' then
    local expired = redis.call('ZRANGEBYSCORE', k2, '-inf', now)
    if #expired > 0 then
      local drop = 0
      for _, m in ipairs(expired) do drop = drop + amount_of(m) end
      redis.call('ZREMRANGEBYSCORE', k2, '-inf', now)
      redis.call('DECRBY', k1, drop)
    end
    used = tonumber(redis.call('GET', k1))
    if used + amount > limit then
      ok = 0
      local reserved = 0
      for _, m in ipairs(redis.call('ZRANGE', k2, 0, -1)) do reserved = reserved + amount_of(m) end
      if used - reserved + amount <= limit then retry = 'soon' end
    end
  else
    redis.call('ZREMRANGEBYSCORE', k1, '-inf', now)
    used = redis.call('ZCARD', k1)
    if used + 1 > limit then ok = 0 end
  end
  if ok == 0 then all_ok = 0 end
  results[i] = {ok, used, retry, newest}
end
if all_ok == 1 then
  for i = 1, n do
    local base = 4 + (i - 1) * 5
    local kind, amount = ARGV[base + 1], ARGV[base + 3]
    local k1, k2 = KEYS[2 * i - 1], KEYS[2 * i]
    if kind == 'W' then
      redis.call('ZADD', k1, now, rid .. ':' .. amount)
      redis.call('INCRBY', k2, amount)
      redis.call('EXPIRE', k1, ARGV[base + 5])
      redis.call('EXPIRE', k2, ARGV[base + 5])
    elseif kind == 'C' then
      redis.call('INCRBY', k1, amount)
      if ARGV[base + 4] == '1' then
        redis.call('ZADD', k2, lease_until, rid .. ':' .. amount)
        redis.call('EXPIRE', k2, ARGV[base + 5])
      end
    else
      redis.call('ZADD', k1, lease_until, rid)
      redis.call('EXPIRE', k1, ARGV[base + 4])
    end
  end
end
return {all_ok, results}
"""

# KEYS[1] = the settled marker, then 2 per check. ARGV: rid, marker ttl, n, then 3 per check: kind, reserved
# amount, actual amount. Reply: 1 settled now, 0 settled before.
SETTLE_LUA = """
local rid = ARGV[1]
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return 0
end
for i = 1, tonumber(ARGV[3]) do
  local base = 3 + (i - 1) * 3
  local kind, reserved, actual = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local k1, k2 = KEYS[2 * i], KEYS[2 * i + 1]
  if kind == 'W' then
    local old = rid .. ':' .. reserved
    local score = redis.call('ZSCORE', k1, old)
    if score then
      redis.call('ZREM', k1, old)
      redis.call('ZADD', k1, score, rid .. ':' .. actual)
      redis.call('INCRBY', k2, tonumber(actual) - tonumber(reserved))
    end
  elseif kind == 'C' then
    if redis.call('EXISTS', k1) == 1 then
      if redis.call('ZREM', k2, rid .. ':' .. reserved) == 1 then
        redis.call('INCRBY', k1, tonumber(actual) - tonumber(reserved))
      else
        -- the lease ran out and the sweep gave the reservation back, or the counter was seeded anew
        -- from the database, which did not know this request yet: count the usage in full
        redis.call('INCRBY', k1, actual)
      end
    end
  else
    redis.call('ZREM', k1, rid)
  end
end
return 1
"""

# KEYS: pairs (counter, its reservation set); ARGV: pairs (value, ttl or '0' for none). A counter that is set
# here starts without reservations: any left from before belong to a state the database sum replaces.
SEED_LUA = """
for i = 1, #KEYS / 2 do
  local key, value, ttl = KEYS[2 * i - 1], ARGV[2 * i - 1], ARGV[2 * i]
  local set
  if ttl == '0' then
    set = redis.call('SET', key, value, 'NX')
  else
    set = redis.call('SET', key, value, 'NX', 'EX', ttl)
  end
  if set then redis.call('DEL', KEYS[2 * i]) end
end
return 1
"""

# Read-only: ARGV: now, n, then 2 per check: kind, cutoff (W). Reply: per check the amount in use, or -1 for a
# counter that does not exist.
INSPECT_LUA = """
local now = ARGV[1]
local out = {}
for i = 1, tonumber(ARGV[2]) do
  local kind, cutoff = ARGV[2 + (i - 1) * 2 + 1], ARGV[2 + (i - 1) * 2 + 2]
  local k1, k2 = KEYS[2 * i - 1], KEYS[2 * i]
  local used = 0
  if kind == 'W' then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', k1, '(' .. cutoff, '+inf')) do
      used = used + tonumber(string.match(m, ':(%d+)$'))
    end
  elseif kind == 'C' then
    local value = redis.call('GET', k1)
    if value then
      used = tonumber(value)
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', k2, '-inf', now)) do
        used = used - tonumber(string.match(m, ':(%d+)$'))
      end
    else
      used = -1
    end
  else
    used = redis.call('ZCOUNT', k1, '(' .. now, '+inf')
  end
  out[i] = used
end
return out
"""

WINDOW_TTL = math.ceil(RATE_WINDOW) + KEY_GRACE


def _ttl(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)) + KEY_GRACE)


class RedisBackend:
    """Limits shared by every instance that points at the same Redis and prefix."""

    name = "redis"
    description = "Redis"
    # What a call may raise: an outage (connection, timeout) or Redis refusing a command (a script error, a
    # key of the wrong type). The admission code catches these without importing coredis itself.
    errors: tuple[type[BaseException], ...] = (
        coredis.exceptions.RedisError,
        OSError,
        TimeoutError,
        trio.TooSlowError,
    )
    refusal: tuple[type[BaseException], ...] = (coredis.exceptions.ResponseError,)

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self.prefix = prefix
        self._reserve = client.register_script(RESERVE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._seed = client.register_script(SEED_LUA)
        self._inspect = client.register_script(INSPECT_LUA)

    def __repr__(self) -> str:
        return f"<RedisBackend prefix={self.prefix!r}>"

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, url: str, prefix: str, *, connect_timeout: float = 1.0, stream_timeout: float = 1.0
    ) -> AsyncIterator[RedisBackend]:
        """Connect (lazily: an unreachable Redis shows up on the first call, not here) and yield the backend.

        No client-side retries: a script resent after a lost reply could reserve twice; the caller's policy
        handles failures instead.
        """
        client = redis_client(url, connect_timeout=connect_timeout, stream_timeout=stream_timeout)
        async with client:
            yield cls(client, prefix)

    def _key(self, check: Check) -> str:
        return f"{self.prefix}:{check.key}"

    async def reserve(self, plan: Plan) -> Answer:
        now = plan.now
        keys: list[str] = []
        args: list[str] = [repr(now), plan.rid, repr(plan.lease_until), str(len(plan.checks))]
        lease_ttl = _ttl(plan.lease_until - now)
        for check in plan.checks:
            key = self._key(check)
            if check.kind is CheckKind.WINDOW:
                keys += [key, key + ":sum"]
                args += ["W", str(check.limit), str(check.amount), repr(now - RATE_WINDOW), str(WINDOW_TTL)]
            elif check.kind is CheckKind.COUNTER:
                keys += [key, key + ":resv"]
                args += ["C", str(check.limit), str(check.amount), "1" if check.settles else "0", lease_ttl]
            else:
                keys += [key, key]
                args += ["G", str(check.limit), "1", lease_ttl, ""]
        status, payload = await self._reserve(keys=keys, args=args)
        if int(status) == 2:
            return NeedsSeed(tuple(int(i) - 1 for i in payload))
        results: list[CheckResult] = []
        for check, (ok, used, retry, newest) in zip(plan.checks, payload, strict=True):
            if check.kind is CheckKind.WINDOW:
                reset = float(newest) + RATE_WINDOW - now if newest else 0.0
                retry_in = float(retry) + RATE_WINDOW - now if retry else None
                results.append(CheckResult(bool(int(ok)), int(used), reset, retry_in))
            else:
                results.append(CheckResult(bool(int(ok)), int(used), None, 1.0 if retry == "soon" else None))
        return tuple(results)

    async def settle(self, reservation: Reservation, actual_tokens: int, actual_cost_nano: int) -> bool:
        """Apply the actual usage; False when this reservation was settled before."""
        keys = [f"{self.prefix}:settled:{reservation.rid}"]
        args = [
            reservation.rid,
            _ttl(reservation.lease_until - reservation.now),
            str(len(reservation.checks)),
        ]
        for check in reservation.checks:
            key = self._key(check)
            if check.kind is CheckKind.GAUGE:
                keys += [key, key]
                args += ["G", "", ""]
                continue
            actual = settled_amount(check, actual_tokens, actual_cost_nano)
            keys += [key, key + (":sum" if check.kind is CheckKind.WINDOW else ":resv")]
            args += [check.kind.value, str(check.amount), str(actual)]
        return int(await self._settle(keys=keys, args=args)) == 1

    async def seed(self, items: Sequence[tuple[Check, int]], now: float) -> None:
        """Store counters summed from the database, each only if it does not exist yet."""
        keys: list[str] = []
        args: list[str] = []
        for check, value in items:
            key = self._key(check)
            end = check.period.end if check.period is not None else None
            keys += [key, key + ":resv"]
            args += [str(value), "0" if end is None else _ttl(end - now)]
        await self._seed(keys=keys, args=args)

    async def used(self, checks: Sequence[Check], now: float) -> list[int | None]:
        """What each check's counter holds now (None: a counter not seeded); reserves nothing."""
        keys: list[str] = []
        args: list[str] = [repr(now), str(len(checks))]
        for check in checks:
            key = self._key(check)
            second = {CheckKind.WINDOW: ":sum", CheckKind.COUNTER: ":resv", CheckKind.GAUGE: ""}[check.kind]
            keys += [key, key + second]
            args += [check.kind.value, repr(now - RATE_WINDOW)]
        reply = await self._inspect(keys=keys, args=args)
        return [None if int(value) < 0 else int(value) for value in reply]
