"""Observability through the admin API: statistics against hand-computed totals, the request log and its
scoping, the audit log, health and system information, the served routes, the load balancer's view of real
traffic and its commands, live limit state, /metrics, and /api/stats/self for key holders.

Every response fetched here is scanned for the secrets the test knows (provider key secrets, gateway keys,
passwords, JWTs, the master key): none may appear in any body.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from admin.app import create_app
from admin.auth import bootstrap_admin
from admin.routes.operations import mask_url, redis_ping
from admin.state import build_state
from tests.integration.admin_support import ADMIN_PASSWORD, USER_PASSWORD, AdminClient, Reply, admin_app
from tests.integration.harness import UPSTREAM_SECRET, Stack, running_stack
from trioproxy.metrics import Metrics, failed_attempts
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.routes import Route, match_route, route_catalogue
from trioproxy.store.provisioning import add_provider_key, create_gateway_key
from trioproxy.store.request_log import insert_request_records
from trioproxy.testing.fake_upstream import FakeUpstream, Fault

UTC = dt.UTC
SECRETS = {"a": "sk-key-aaaaaaaaaaaaaaaaaaaaaaaa", "b": "sk-key-bbbbbbbbbbbbbbbbbbbbbbbb"}
ALICE_SECRET = "sk-alice-0123456789abcdefghijkl"
BOB_SECRET = "sk-bob-0123456789abcdefghijklmn"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
JWT_SHAPE = re.compile(r"eyJ[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]{8,}\.")
GATEWAY_KEY_SHAPE = re.compile(r"tpk_[0-9A-Za-z]{20,}")


@asynccontextmanager
async def admin_over(stack: Stack) -> AsyncIterator[AdminClient]:
    """The admin app over a running stack's store and data plane (in-process, through Quart's test client),
    with the bootstrap administrator's password set to ADMIN_PASSWORD."""
    settings = dataclasses.replace(stack.settings, admin_password=ADMIN_PASSWORD)
    state = await trio.to_thread.run_sync(
        partial(build_state, settings, stack.engine, stack.box, gateway=stack.gateway)
    )
    app = create_app(state)
    async with app.test_app() as test_app:
        client = AdminClient(app, state, test_app)
        await bootstrap_admin(state, client.announced.append)
        yield client


def assert_no_secrets(replies: Iterable[Reply], secrets: Iterable[str]) -> int:
    """No reply body or header holds any of ``secrets``, a JWT or a gateway key; returns the bytes scanned."""
    scanned = 0
    for reply in replies:
        text = reply.body.decode("utf-8", "replace") + json.dumps(reply.headers)
        scanned += len(text)
        for secret in secrets:
            assert secret not in text, (secret[:6], text[:300])
        assert not JWT_SHAPE.search(text), text[:300]
        assert not GATEWAY_KEY_SHAPE.search(text), text[:300]
    return scanned


def _record(
    when: dt.datetime,
    *,
    user_id: int | None,
    gateway_key_id: int | None,
    provider_id: int | None,
    model: str = "gpt-4o",
    outcome: Outcome = Outcome.OK,
    status: int = 200,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost: str | None = None,
    duration_ms: float = 100.0,
    request_id: str | None = None,
    attempt_log: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id or f"r-{when.timestamp():.6f}-{user_id}-{model}-{input_tokens}",
        started_at=when.timestamp(),
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip="203.0.113.7",
        gateway_key_id=gateway_key_id,
        provider_key_id=None,
        user_id=user_id,
        provider_id=provider_id,
        provider_kind="openai",
        model=model,
        status=status,
        outcome=outcome,
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens, reported=True, complete=True),
        cost=None if cost is None else CostBreakdown(Decimal(cost), Decimal(0), Decimal(0), Decimal(0)),
        price_missing=cost is None and outcome is Outcome.OK,
        duration_ms=duration_ms,
        attempts=1,
        attempt_log=attempt_log,
    )


@dataclasses.dataclass
class Tenants:
    admin: str
    alice_id: int
    alice: str
    bob_id: int
    bob: str
    provider_id: int
    alice_key: int
    bob_key: int


async def _tenants(client: AdminClient) -> Tenants:
    """Two users with a gateway key each over their own provider key, all created through the API."""
    admin = await client.token()
    alice_id, alice = await client.make_user(admin, "alice", "user")
    bob_id, bob = await client.make_user(admin, "bob", "user")
    provider = await client.call(
        "POST",
        "/api/providers",
        token=admin,
        json_body={"name": "oa", "kind": "openai", "base_url": "https://api.example.com"},
    )
    assert provider.status == 201, provider.body
    keys = {}
    for name, token, secret in (("alice", alice, ALICE_SECRET), ("bob", bob, BOB_SECRET)):
        pk = await client.call(
            "POST",
            "/api/provider-keys",
            token=token,
            json_body={"provider_id": provider.json["id"], "name": f"{name}-pk", "secret": secret},
        )
        assert pk.status == 201, pk.body
        gk = await client.call(
            "POST",
            "/api/keys",
            token=token,
            json_body={"name": f"{name}-app", "provider_id": provider.json["id"]},
        )
        assert gk.status == 201, gk.body
        keys[name] = int(gk.json["id"])
    return Tenants(admin, alice_id, alice, bob_id, bob, int(provider.json["id"]), keys["alice"], keys["bob"])


def _totals(body: dict[str, Any]) -> tuple[int, int, int, int, str, int]:
    return (
        body["requests"],
        body["successes"],
        body["input_tokens"],
        body["output_tokens"],
        body["cost"],
        body["unpriced_requests"],
    )


# --- statistics ---------------------------------------------------------------------------------------------


async def test_statistics_equal_hand_computed_totals_and_users_see_only_theirs(
    tmp_path: Path, db_url: str
) -> None:
    async with admin_app(tmp_path, db_url) as client:
        t = await _tenants(client)
        alice = partial(_record, user_id=t.alice_id, gateway_key_id=t.alice_key, provider_id=t.provider_id)
        bob = partial(_record, user_id=t.bob_id, gateway_key_id=t.bob_key, provider_id=t.provider_id)
        # A fixed past day (UTC), three hours of it.
        day = dt.datetime(2025, 1, 10, tzinfo=UTC)
        past = [
            alice(
                day.replace(hour=10, minute=15),
                input_tokens=100,
                output_tokens=10,
                cost="0.0012",
                duration_ms=100,
            ),
            alice(
                day.replace(hour=10, minute=45),
                input_tokens=200,
                output_tokens=20,
                cost="0.0024",
                duration_ms=300,
            ),
            alice(
                day.replace(hour=12),
                model="gpt-4o-mini",
                outcome=Outcome.UPSTREAM_ERROR,
                status=500,
                duration_ms=50,
            ),
            alice(
                day.replace(hour=12, minute=30), model="gpt-4o-mini", input_tokens=7, output_tokens=3
            ),  # no price
            bob(day.replace(hour=11), input_tokens=1000, output_tokens=100, cost="0.5", duration_ms=1000),
            bob(
                day.replace(hour=23, minute=30), input_tokens=1, output_tokens=1, cost="0.0000001"
            ),  # 00:30 Berlin
        ]
        # Today and yesterday in UTC, for the overview (relative to now, an hour apart from midnight's edge).
        now = dt.datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        recent = [
            alice(midnight + (now - midnight) / 2, input_tokens=5, output_tokens=5, cost="0.01"),
            alice(midnight - dt.timedelta(hours=1), input_tokens=6, output_tokens=6, cost="0.02"),
            bob(midnight + (now - midnight) / 3, input_tokens=9, output_tokens=9, cost="0.04"),
        ]
        await trio.to_thread.run_sync(insert_request_records, client.state.engine, past + recent)
        client.seen.clear()

        async def get(token: str, path: str) -> dict[str, Any]:
            reply = await client.call("GET", path, token=token)
            assert reply.status == 200, (path, reply.body)
            body: dict[str, Any] = reply.json
            return body

        # Overview: today versus yesterday, hand-computed.
        everyone = await get(t.admin, "/api/statistics/overview?tz=UTC")
        assert _totals(everyone["today"]) == (2, 2, 14, 14, "0.05", 0)
        assert _totals(everyone["yesterday"]) == (1, 1, 6, 6, "0.02", 0)
        mine = await get(t.alice, "/api/statistics/overview?tz=UTC")
        assert _totals(mine["today"]) == (1, 1, 5, 5, "0.01", 0)
        assert _totals(mine["yesterday"]) == (1, 1, 6, 6, "0.02", 0)
        assert dt.datetime.fromisoformat(mine["today"]["start"]) == midnight

        # Hourly buckets of the fixed day: 10:00 has two requests, 11:00 one (bob's), 12:00 two.
        window = "since=2025-01-10T10:00:00Z&until=2025-01-10T13:00:00Z"
        hours = await get(t.admin, f"/api/statistics/timeseries?bucket=hour&tz=UTC&{window}")
        assert [(b["start"], b["requests"], b["cost"]) for b in hours["items"]] == [
            ("2025-01-10T10:00:00Z", 2, "0.0036"),
            ("2025-01-10T11:00:00Z", 1, "0.5"),
            ("2025-01-10T12:00:00Z", 2, "0"),
        ]
        assert hours["items"][0]["avg_latency_ms"] == 200.0
        assert hours["items"][2]["success_rate"] == 0.5
        alice_hours = await get(t.alice, f"/api/statistics/timeseries?bucket=hour&tz=UTC&{window}")
        assert [b["requests"] for b in alice_hours["items"]] == [2, 0, 2]

        # Day buckets in Berlin, with since/until given without an offset (read in tz): bob's 23:30 UTC request
        # is on the 11th there.
        berlin = "tz=Europe/Berlin&since=2025-01-10T00:00:00&until=2025-01-12T00:00:00"
        days = await get(t.admin, f"/api/statistics/timeseries?bucket=day&{berlin}")
        assert [(b["start"], b["requests"]) for b in days["items"]] == [
            ("2025-01-10T00:00:00+01:00", 5),
            ("2025-01-11T00:00:00+01:00", 1),
        ]
        assert dt.datetime.fromisoformat(days["since"]) == dt.datetime(2025, 1, 9, 23, tzinfo=UTC)

        # Breakdowns over the fixed day.
        day_range = "tz=UTC&since=2025-01-10T00:00:00Z&until=2025-01-11T00:00:00Z"
        models = await get(t.admin, f"/api/statistics/models?{day_range}")
        assert [(m["model"], m["requests"], m["cost"], m["unpriced_requests"]) for m in models["items"]] == [
            ("gpt-4o", 4, "0.5036001", 0),
            ("gpt-4o-mini", 2, "0", 1),
        ]
        keys = await get(t.admin, f"/api/statistics/keys?{day_range}")
        assert {(k["gateway_key_id"], k["name"], k["requests"]) for k in keys["items"]} == {
            (t.alice_key, "alice-app", 4),
            (t.bob_key, "bob-app", 2),
        }
        only_bob = await get(t.admin, f"/api/statistics/keys?{day_range}&gateway_key_id={t.bob_key}")
        assert [k["gateway_key_id"] for k in only_bob["items"]] == [t.bob_key]
        providers = await get(t.admin, f"/api/statistics/providers?{day_range}")
        assert [(p["provider_id"], p["name"], p["requests"]) for p in providers["items"]] == [
            (t.provider_id, "oa", 6)
        ]
        # A user's breakdowns hold only its own requests, whatever it asks for.
        assert [
            k["gateway_key_id"] for k in (await get(t.alice, f"/api/statistics/keys?{day_range}"))["items"]
        ] == [t.alice_key]
        assert (await get(t.alice, f"/api/statistics/models?{day_range}&gateway_key_id={t.bob_key}"))[
            "items"
        ] == []
        alice_models = await get(t.alice, f"/api/statistics/models?{day_range}")
        assert [(m["model"], m["requests"], m["cost"]) for m in alice_models["items"]] == [
            ("gpt-4o", 2, "0.0036"),
            ("gpt-4o-mini", 2, "0"),
        ]
        assert (await get(t.alice, f"/api/statistics/providers?{day_range}"))["items"][0]["requests"] == 4

        # Time zones are validated: unknown names (a directory of the zone database included) are 400.
        for bad in ("Mars/Olympus_Mons", "America", "../../etc/passwd", "UTC%00"):
            for route in ("overview", "timeseries", "models", "keys", "providers"):
                reply = await client.call("GET", f"/api/statistics/{route}?tz={bad}", token=t.admin)
                assert reply.status == 400, (bad, route, reply.body)
                assert reply.error_code == "bad_request"
        reply = await client.call(
            "GET",
            "/api/statistics/timeseries?since=2025-01-02T00:00:00Z&until=2025-01-01T00:00:00Z",
            token=t.admin,
        )
        assert reply.status == 400
        reply = await client.call(
            "GET", "/api/statistics/timeseries?bucket=hour&since=1970-01-01T00:00:00Z", token=t.admin
        )
        assert reply.status == 422  # more than 10,000 hour buckets
        reply = await client.call("GET", "/api/statistics/models?since=0001-01-01T00:00:00", token=t.admin)
        assert reply.status == 400
        assert_no_secrets(
            client.seen, [ALICE_SECRET, BOB_SECRET, ADMIN_PASSWORD, USER_PASSWORD, "test-master-key"]
        )


# --- request log and audit ----------------------------------------------------------------------------------


async def test_request_log_filters_scoping_and_audit(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        t = await _tenants(client)
        _, reader = await client.make_user(t.admin, "rita", "read_only")
        base = dt.datetime(2025, 2, 1, 12, tzinfo=UTC)
        log = json.dumps(
            [
                {"key": 7, "status": 500, "error": None, "ms": 3.5},
                {"key": 8, "status": 200, "error": None, "ms": 9.0},
            ]
        )
        rows = [
            _record(
                base,
                user_id=t.alice_id,
                gateway_key_id=t.alice_key,
                provider_id=t.provider_id,
                request_id="alice-1",
                attempt_log=log,
                cost="0.1",
            ),
            _record(
                base + dt.timedelta(minutes=1),
                user_id=t.alice_id,
                gateway_key_id=t.alice_key,
                provider_id=t.provider_id,
                request_id="alice-2",
                model="o1",
                status=429,
                outcome=Outcome.REJECTED,
            ),
            _record(
                base + dt.timedelta(minutes=2),
                user_id=t.bob_id,
                gateway_key_id=t.bob_key,
                provider_id=t.provider_id,
                request_id="bob-1",
            ),
        ]
        await trio.to_thread.run_sync(insert_request_records, client.state.engine, rows)
        client.seen.clear()

        everything = await client.call("GET", "/api/requests", token=t.admin)
        assert everything.status == 200
        assert [r["request_id"] for r in everything.json["items"]] == ["bob-1", "alice-2", "alice-1"]
        assert everything.json["total"] == 3
        mine = await client.call("GET", "/api/requests", token=t.alice)
        assert [r["request_id"] for r in mine.json["items"]] == ["alice-2", "alice-1"]
        # Another user's request is not found, exactly like a missing one; one's own is.
        for token, request_id, status in (
            (t.alice, "bob-1", 404),
            (t.alice, "nope", 404),
            (t.alice, "x" * 200, 404),
            (t.alice, "alice-1", 200),
            (t.bob, "alice-1", 404),
            (t.admin, "alice-1", 200),
        ):
            reply = await client.call("GET", f"/api/requests/{request_id}", token=token)
            assert reply.status == status, (request_id, reply.body)
            if status == 404:
                assert reply.error_code == "not_found"
        one = (await client.call("GET", "/api/requests/alice-1", token=t.alice)).json
        assert one["attempts_log"] == [
            {"key": 7, "status": 500, "error": None, "ms": 3.5},
            {"key": 8, "status": 200, "error": None, "ms": 9.0},
        ]
        assert one["cost_total"] == "0.1"
        assert one["started_at"].startswith("2025-02-01T12:00:00")
        # Filters.
        for query, expected in (
            ("model=o1", ["alice-2"]),
            ("status=429", ["alice-2"]),
            ("outcome=ok", ["bob-1", "alice-1"]),
            (f"gateway_key_id={t.bob_key}", ["bob-1"]),
            ("since=2025-02-01T12:01:00Z", ["bob-1", "alice-2"]),
            ("until=2025-02-01T12:01:00%2B00:00", ["alice-1"]),
            ("page_size=1&page=2", ["alice-2"]),
        ):
            reply = await client.call("GET", f"/api/requests?{query}", token=t.admin)
            assert reply.status == 200, (query, reply.body)
            assert [r["request_id"] for r in reply.json["items"]] == expected, query
        assert (await client.call("GET", "/api/requests?outcome=bogus", token=t.admin)).status == 422
        assert (
            await client.call("GET", "/api/requests?since=2025-02-01T12:00:00", token=t.admin)
        ).status == 400
        assert (
            await client.call("GET", "/api/requests?since=0001-01-01T00:00:00%2B01:00", token=t.admin)
        ).status == 400
        # read_only reads its (empty) log; nobody without view_logs reads any.
        assert (await client.call("GET", "/api/requests", token=reader)).json["total"] == 0

        # The audit log: every write of _tenants is there, once; users do not read it.
        audit = await client.call("GET", "/api/audit?object_type=gateway_key&action=create", token=t.admin)
        assert audit.status == 200
        assert audit.json["total"] == 2
        assert {row["actor_name"] for row in audit.json["items"]} == {"alice", "bob"}
        assert all(row["after"]["prefix"] for row in audit.json["items"])
        by_alice = await client.call("GET", f"/api/audit?actor_id={t.alice_id}", token=t.admin)
        assert {row["object_type"] for row in by_alice.json["items"]} >= {"provider_key", "gateway_key"}
        assert (await client.call("GET", "/api/audit", token=t.alice)).status == 403
        assert (await client.call("POST", "/api/audit", token=t.admin, json_body={})).status == 405
        assert_no_secrets(
            client.seen, [ALICE_SECRET, BOB_SECRET, ADMIN_PASSWORD, USER_PASSWORD, "test-master-key"]
        )


# --- the data plane's view ----------------------------------------------------------------------------------


def _fake() -> FakeUpstream:
    return FakeUpstream(accepted_keys=(UPSTREAM_SECRET, *SECRETS.values()))


async def _pool(stack: Stack) -> tuple[str, dict[str, int], int]:
    """A round-robin gateway key over provider keys a and b of the OpenAI provider (retries on)."""
    ids = {}
    for name, secret in SECRETS.items():
        created = await trio.to_thread.run_sync(
            partial(
                add_provider_key,
                stack.engine,
                stack.box,
                provider="openai-fake",
                name=f"key-{name}",
                secret=secret,
            )
        )
        ids[name] = int(created["id"])
    gk = await trio.to_thread.run_sync(
        partial(
            create_gateway_key,
            stack.engine,
            name="pool",
            provider="openai-fake",
            provider_keys=["key-a", "key-b"],
            retry_count=2,
        )
    )
    await stack.wait_for_config(
        lambda: any(g.name == "pool" for g in stack.gateway.snapshots.current.gateway_keys.values())
    )
    return str(gk["key"]), ids, int(gk["id"])


async def _chat(stack: Stack, key: str, n: int) -> list[int]:
    statuses = []
    async with httpcore.AsyncConnectionPool() as pool:
        for _ in range(n):
            response = await pool.request(
                "POST",
                stack.base_url + "/v1/chat/completions",
                headers=[("authorization", f"Bearer {key}"), ("content-type", "application/json")],
                content=json.dumps(CHAT).encode(),
            )
            await response.aread()
            statuses.append(response.status)
    return statuses


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_loadbalancer_status_metrics_and_commands_after_real_traffic(tmp_path: Path) -> None:
    fake = _fake()
    fake.add_fault(Fault(status=500), api_key=SECRETS["b"], forever=True)
    async with running_stack(tmp_path, fake=fake) as stack, admin_over(stack) as client:
        key, ids, pool_id = await _pool(stack)
        admin = await client.token()
        operator_id, operator = await client.make_user(admin, "olga", "operator")
        _, user = await client.make_user(admin, "ursula", "user")
        client.seen.clear()  # the logins above answered with tokens, by design
        before = _samples((await client.call("GET", "/metrics")).body.decode())

        assert await _chat(stack, key, 20) == [200] * 20  # b fails every time, the retry on a succeeds
        await _chat(stack, "tpk_not-a-real-key", 1)  # 401, counted as a rejection
        async with httpcore.AsyncConnectionPool() as raw:  # refused by the route allowlist
            await raw.request("GET", stack.base_url + "/v1/files")
        await stack.rows(22)

        status = await client.call("GET", "/api/loadbalancer/status", token=admin)
        assert status.status == 200
        [pool] = [p for p in status.json["pools"] if p["gateway_key_id"] == pool_id]
        keys = {k["name"]: k for k in pool["keys"]}
        assert keys["key-b"]["state"] == "ejected"
        assert "500" in keys["key-b"]["last_error"]
        assert keys["key-b"]["deadline_in"] > 0
        assert keys["key-a"]["state"] == "active"
        assert keys["key-a"]["success_rate"] == 1.0
        assert pool["strategy"] == "round_robin" and pool["available_keys"] == 1
        # A user sees only the pools of its own keys (it has none).
        assert (await client.call("GET", "/api/loadbalancer/status", token=user)).json["pools"] == []

        after = _samples((await client.call("GET", "/metrics")).body.decode())
        chat = {"route": "openai.chat_completions", "status": "200", "outcome": "ok"}
        assert (
            _value(after, "trioproxy_requests_total", **chat)
            - _value(before, "trioproxy_requests_total", **chat)
            == 20
        )
        assert (
            _value(
                after,
                "trioproxy_requests_total",
                route="openai.chat_completions",
                status="401",
                outcome="rejected",
            )
            >= 1
        )
        assert (
            _value(after, "trioproxy_requests_total", route="unknown", status="404", outcome="rejected") >= 1
        )
        assert _value(after, "trioproxy_upstream_errors_total", provider_kind="openai", cause="500") == 5
        assert (
            _value(after, "trioproxy_balancer_transitions_total", **{"from": "active", "to": "ejected"}) == 1
        )
        assert _value(after, "trioproxy_provider_keys", state="ejected") == 1
        assert _value(after, "trioproxy_tokens_total", provider_kind="openai", kind="input") > 0
        assert (
            _value(after, "trioproxy_request_duration_seconds_count", route="openai.chat_completions") >= 21
        )
        assert (
            _value(after, "trioproxy_time_to_first_byte_seconds_count", route="openai.chat_completions") == 20
        )
        assert _value(after, "trioproxy_in_flight_requests") == 0
        assert _value(after, "trioproxy_metering_written_total") >= 22
        assert _value(after, "trioproxy_upstream_connections", state="idle") >= 1
        assert _value(after, "trioproxy_build_info", version="0.1.0") == 1

        # Commands: reset puts b back at once (and is audited); disable/enable persist through the store.
        reset = await client.call("POST", f"/api/loadbalancer/keys/{ids['b']}/reset", token=operator)
        assert reset.status == 200, reset.body
        assert reset.json["state"] == "active" and reset.json["last_error"] is None
        assert (
            await client.call("POST", f"/api/loadbalancer/keys/{ids['b']}/reset", token=user)
        ).status == 403
        assert (await client.call("POST", "/api/loadbalancer/keys/999999/reset", token=admin)).status == 404
        disabled = await client.call("POST", f"/api/loadbalancer/keys/{ids['b']}/disable", token=operator)
        assert disabled.status == 200, disabled.body
        assert disabled.json["enabled"] is False and disabled.json["secret_hint"] != SECRETS["b"]
        await stack.wait_for_config(
            lambda: not stack.gateway.snapshots.current.provider_keys[ids["b"]].enabled
        )
        stack.fake.captured.clear()
        assert await _chat(stack, key, 4) == [200] * 4
        assert {c.header("authorization") for c in stack.fake.captured} == {f"Bearer {SECRETS['a']}"}
        enabled = await client.call("POST", f"/api/loadbalancer/keys/{ids['b']}/enable", token=admin)
        assert enabled.status == 200 and enabled.json["enabled"] is True
        await stack.wait_for_config(lambda: stack.gateway.snapshots.current.provider_keys[ids["b"]].enabled)
        audit = await client.call("GET", "/api/audit?object_type=provider_key", token=admin)
        actions = [(row["action"], row["actor_id"]) for row in audit.json["items"]]
        assert actions[:3] == [("update", 1), ("update", operator_id), ("reset_health", operator_id)]

        # Health and system information.
        health = await client.call("GET", "/api/health")
        assert health.status == 200 and health.json == {"status": "ok"}
        detailed = await client.call("GET", "/api/health/detailed", token=admin)
        assert detailed.json["status"] == "ok"
        assert detailed.json["database"]["ok"] is True
        assert detailed.json["data_plane"]["running"] is True
        assert detailed.json["data_plane"]["proxy_port"] == stack.gateway.proxy_port
        assert detailed.json["redis"] == {
            "configured": False,
            "ok": None,
            "latency_ms": None,
            "error": None,
            "limits_backend": "local",
        }
        assert detailed.json["provider_keys"]["total"] == 5
        info = await client.call("GET", "/api/system/info", token=admin)
        assert info.json["ports"]["proxy"] == stack.gateway.proxy_port
        assert info.json["version"] == "0.1.0" and info.json["uptime_seconds"] >= 0
        assert info.json["database"]["dialect"] == "sqlite"
        info_user = await client.call("GET", "/api/system/info", token=user)
        assert info_user.json["database"] is None and info_user.json["redis"] is None
        limits = await client.call("GET", f"/api/keys/{pool_id}/limits", token=admin)
        assert limits.status == 200 and limits.json["limits"] == [] and limits.json["backend"] == "local"
        assert (await client.call("GET", f"/api/keys/{pool_id}/limits", token=user)).status == 404

        tokens = [admin, operator, user]
        assert_no_secrets(
            client.seen,
            [
                *SECRETS.values(),
                UPSTREAM_SECRET,
                key,
                *stack.keys.values(),
                ADMIN_PASSWORD,
                USER_PASSWORD,
                "test-master-key",
                *tokens,
            ],
        )


async def test_stats_self_and_key_limits_for_a_key_holder(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, admin_over(stack) as client:
        admin = await client.token()
        key = stack.keys["openai"]
        [view] = [
            g for g in stack.gateway.snapshots.current.gateway_keys.values() if g.name == "openai-client"
        ]
        patched = await client.call(
            "PATCH", f"/api/keys/{view.id}", token=admin, json_body={"rpm_limit": 50, "budget": "10"}
        )
        assert patched.status == 200, patched.body
        await stack.wait_for_config(
            lambda: (
                next(
                    g for g in stack.gateway.snapshots.current.gateway_keys.values() if g.id == view.id
                ).rpm_limit
                == 50
            )
        )
        assert await _chat(stack, key, 3) == [200] * 3
        await stack.rows(3)
        client.seen.clear()

        own = await client.call(
            "GET", "/api/stats/self?tz=Europe/Berlin", headers={"Authorization": f"Bearer {key}"}
        )
        assert own.status == 200, own.body
        assert own.json["gateway_key_id"] == view.id and own.json["name"] == "openai-client"
        assert own.json["today"]["requests"] == 3 and own.json["month"]["requests"] == 3
        assert own.json["today"]["input_tokens"] > 0
        assert own.json["limits"]["rpm_limit"] == 50 and own.json["limits"]["budget"] == "10"
        assert own.json["tz"] == "Europe/Berlin"
        # The key opens its own usage only from the Authorization header.
        for headers, path in (
            ({}, f"/api/stats/self?key={key}"),
            ({"x-api-key": key}, "/api/stats/self"),
            ({"Authorization": f"Bearer {admin}"}, "/api/stats/self"),
            ({"Authorization": f"Bearer {key}x"}, "/api/stats/self"),
            ({}, "/api/stats/self"),
        ):
            reply = await client.call("GET", path, headers=headers)
            assert reply.status == 401, (headers.keys(), path)
            assert reply.error_code == "unauthorized"
        bad_zone = await client.call(
            "GET", "/api/stats/self?tz=Nowhere/City", headers={"Authorization": f"Bearer {key}"}
        )
        assert bad_zone.status == 400
        # A disabled key reads nothing, as the proxy accepts nothing from it.
        await client.call("PATCH", f"/api/keys/{view.id}", token=admin, json_body={"enabled": False})
        await stack.wait_for_config(
            lambda: (
                not next(
                    g for g in stack.gateway.snapshots.current.gateway_keys.values() if g.id == view.id
                ).enabled
            )
        )
        assert (
            await client.call("GET", "/api/stats/self", headers={"Authorization": f"Bearer {key}"})
        ).status == 401
        await client.call("PATCH", f"/api/keys/{view.id}", token=admin, json_body={"enabled": True})

        limits = await client.call("GET", f"/api/keys/{view.id}/limits", token=admin)
        assert limits.status == 200, limits.body
        entries = {(e["scope"], e["name"]): e for e in limits.json["limits"]}
        assert entries[("gateway_key", "rpm")]["used"] == 3
        assert entries[("gateway_key", "rpm")]["remaining"] == 47
        assert entries[("gateway_key", "budget")]["unit"] == "usd"
        assert Decimal(limits.json["budget_left_usd"]) <= Decimal(10)
        assert (await client.call("GET", "/api/keys/999999/limits", token=admin)).status == 404
        # Unknown path ids for the data plane's commands answer 404 before anything else.
        assert_no_secrets(client.seen, [UPSTREAM_SECRET, key, ADMIN_PASSWORD, "test-master-key", admin])


# --- pure parts ---------------------------------------------------------------------------------------------


def test_adapters_are_derived_from_the_route_table() -> None:
    """Every route /api/adapters lists is one match_route serves under that name (and vice versa)."""
    catalogue = route_catalogue()
    headers_for = {
        None: [],
        "anthropic-version header": [(b"anthropic-version", b"2023-06-01")],
        "x-goog-api-key or x-goog-api-client header, or ?key=": [(b"x-goog-api-key", b"k")],
        "the default (no Anthropic or Gemini marker)": [],
    }
    for route in catalogue:
        matched = match_route(
            route.method, route.path.replace("{model}", "gemini-2.5-flash"), headers_for[route.selector]
        )
        assert isinstance(matched, Route), route
        assert (matched.name, matched.kind, matched.billable) == (route.name, route.kind, route.billable)
    names = {r.name for r in catalogue}
    assert {"openai.chat_completions", "anthropic.messages", "gemini.stream_generate_content"} <= names
    assert len({(r.method, r.path, r.selector) for r in catalogue}) == len(catalogue)


async def test_adapters_route(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as client:
        token = await client.token()
        reply = await client.call("GET", "/api/adapters", token=token)
        assert reply.status == 200
        kinds = {p["kind"]: p["routes"] for p in reply.json["providers"]}
        assert set(kinds) == {"openai", "anthropic", "gemini"}
        assert sum(len(routes) for routes in kinds.values()) == len(route_catalogue())
        assert "weighted" in reply.json["strategies"]
        assert (await client.call("GET", "/api/adapters")).status == 401
        # Without a proxy in this process: the load balancer is empty, commands needing it are 503.
        status = await client.call("GET", "/api/loadbalancer/status", token=token)
        assert status.json == {"data_plane": False, "config_version": None, "pools": []}
        metrics = await client.call("GET", "/metrics")
        assert metrics.status == 200 and b"trioproxy_build_info" in metrics.body
        assert metrics.headers["content-type"].startswith("text/plain")


async def test_metrics_want_the_token_when_one_is_configured(tmp_path: Path) -> None:
    async with admin_app(tmp_path, metrics_token="scrape-secret-123") as client:
        missing = await client.call("GET", "/metrics")
        wrong = await client.call("GET", "/metrics", headers={"Authorization": "Bearer nope"})
        admin_jwt = await client.call("GET", "/metrics", token=await client.token())
        right = await client.call("GET", "/metrics", headers={"Authorization": "Bearer scrape-secret-123"})
    assert missing.status == wrong.status == admin_jwt.status == 401
    assert missing.json["error"]["code"] == "unauthorized"
    assert right.status == 200 and b"trioproxy_build_info" in right.body
    assert b"scrape-secret-123" not in right.body


@pytest.mark.parametrize(
    ("url", "hidden"),
    [
        ("postgresql+psycopg://trio:s3cr3t-pw@db.internal:5432/trioproxy", "s3cr3t-pw"),
        ("postgresql://trio@db/x?password=qs-secret&sslmode=require", "qs-secret"),
        ("redis://:redis-pass@127.0.0.1:6379/0", "redis-pass"),
        ("rediss://user:tls-pass@cache:6380/1", "tls-pass"),
        ("not a url at all with a pass-word", "pass-word"),
    ],
)
def test_urls_are_masked(url: str, hidden: str) -> None:
    masked = mask_url(url)
    assert masked is not None and hidden not in masked


def test_metrics_registries_are_per_instance_and_attempt_causes() -> None:
    one, two = Metrics(), Metrics()
    record = _record(
        dt.datetime(2025, 1, 1, tzinfo=UTC), user_id=1, gateway_key_id=1, provider_id=1, input_tokens=3
    )
    record.attempt_log = json.dumps(
        [
            {"key": 1, "status": 503, "error": None},
            {"key": 2, "status": None, "error": "connect failed"},
            {"key": 3, "status": 200, "error": "error event as the first event"},
            {"key": None, "status": None, "error": "total deadline exceeded"},
            {"key": 4, "status": 200, "error": None},
        ]
    )
    one.observe(record)
    first = _samples(one.render().decode())
    assert (
        _value(first, "trioproxy_requests_total", route="openai.chat_completions", status="200", outcome="ok")
        == 1
    )
    assert (
        _value(
            _samples(two.render().decode()),
            "trioproxy_requests_total",
            route="openai.chat_completions",
            status="200",
            outcome="ok",
        )
        == 0
    )
    causes = {
        cause: _value(first, "trioproxy_upstream_errors_total", provider_kind="openai", cause=cause)
        for cause in ("503", "transport", "stream_error", "deadline")
    }
    assert causes == {"503": 1, "transport": 1, "stream_error": 1, "deadline": 1}
    assert failed_attempts("not json") == []
    assert failed_attempts('{"key": 1}') == []


async def test_detailed_health_reports_redis(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    async with (
        running_stack(tmp_path, redis_url=redis_url, redis_prefix=redis_prefix) as stack,
        admin_over(stack) as client,
    ):
        admin = await client.token()
        assert await _chat(stack, stack.keys["openai"], 1) == [200]
        detailed = await client.call("GET", "/api/health/detailed", token=admin)
        redis = detailed.json["redis"]
        assert (redis["configured"], redis["ok"], redis["error"], redis["limits_backend"]) == (
            True,
            True,
            None,
            "redis",
        )
        assert redis["latency_ms"] >= 0
        assert detailed.json["status"] == "ok"
        info = await client.call("GET", "/api/system/info", token=admin)
        assert info.json["redis"]["url"] == redis_url  # no password in this URL: shown as it is


async def test_redis_ping(redis_url: str) -> None:
    assert await redis_ping(redis_url) is None
    assert (
        await redis_ping(redis_url.replace("redis://", "redis://:wrong-password@"))
        == "refused (authentication?)"
    )
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        await redis_ping(f"redis://127.0.0.1:{port}/0")
