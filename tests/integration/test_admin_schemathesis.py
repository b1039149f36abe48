"""schemathesis against ``/api/openapi.json``: every documented operation, fuzzed with valid and invalid input
under an administrator's token, must never answer 5xx and must answer what the document says (status codes,
content types, response bodies and headers).

The admin app is served by hypercorn on a real socket beside a running data plane (so the load balancer, limits
and metrics routes have something to show); schemathesis' synchronous client runs in a worker thread while trio
serves. The example count is bounded (a few per operation and mode; more under ``CI=true``) so the run stays
well under a minute.

Left out of the fuzzing, each for a reason, and covered by their own tests: ``POST /api/auth/logout`` and
``POST /api/auth/password`` (they revoke the fuzzer's own token), ``POST /api/provider-keys/{key_id}/test``
(it opens connections to whatever base URL the fuzzer gave a provider), and changes to the fuzzer's own account.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpcore
import hypothesis
import schemathesis
import trio
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from admin.serve import serve_admin
from admin.state import build_state
from tests.integration.admin_support import ADMIN_PASSWORD, USER_PASSWORD
from tests.integration.harness import Stack, running_stack

EXAMPLES = 15 if os.environ.get("CI") == "true" else 5  # per operation and generation mode
SKIPPED = {
    ("POST", "/api/auth/logout"),
    ("POST", "/api/auth/password"),
    ("POST", "/api/provider-keys/{key_id}/test"),
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@asynccontextmanager
async def admin_server(stack: Stack) -> AsyncIterator[str]:
    """The admin API on a real socket beside the stack's data plane; yields its base URL."""
    settings = dataclasses.replace(stack.settings, admin_password=ADMIN_PASSWORD)
    state = await trio.to_thread.run_sync(
        partial(build_state, settings, stack.engine, stack.box, gateway=stack.gateway)
    )
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(partial(serve_admin, state, "127.0.0.1", 0, announce=lambda _: None))
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def _call(base: str, method: str, path: str, *, token: str | None = None, body: Any = None) -> Any:
    headers = [("content-type", "application/json")]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request(
            method, base + path, headers=headers, content=b"" if body is None else json.dumps(body).encode()
        )
    assert response.status < 300, (path, response.content)
    return json.loads(response.content)


def _fuzz(document: dict[str, Any], base: str, token: str, fuzzer_id: int) -> tuple[int, list[str]]:
    """Run schemathesis over every operation (blocking: runs in a worker thread); (cases run, failures)."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"the document has an invalid operation: {result.err()}")
            continue
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                nonlocal ran
                user = (case.path_parameters or {}).get("user_id")
                hypothesis.assume(not (user == fuzzer_id and case.method.upper() in ("PATCH", "DELETE")))
                response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
                ran += 1
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                pass
            except Exception as exc:
                failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}]: {exc}"[:3000])
    return ran, failures


async def test_schemathesis_finds_no_server_errors_and_no_schema_violations(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, admin_server(stack) as base:
        login = await _call(
            base, "POST", "/api/auth/login", body={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin = login["access_token"]
        fuzzer = await _call(
            base,
            "POST",
            "/api/users",
            token=admin,
            body={"username": "fuzzer", "password": USER_PASSWORD, "role": "super_admin"},
        )
        token = (
            await _call(
                base, "POST", "/api/auth/login", body={"username": "fuzzer", "password": USER_PASSWORD}
            )
        )["access_token"]
        document = await _call(base, "GET", "/api/openapi.json")
        ran, failures = await trio.to_thread.run_sync(
            partial(_fuzz, document, base, token, int(fuzzer["id"]))
        )
    assert not failures, "\n\n".join(failures)
    operations = sum(len(methods) for methods in document["paths"].values())
    assert operations >= 50
    assert ran >= (operations - len(SKIPPED)) * 2  # every operation was really called, in both modes
