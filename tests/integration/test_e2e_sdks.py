"""The official SDKs through trioproxy to the fake upstream, stream and non-stream, with the rows they leave.

Each SDK runs synchronously in a worker thread (they are blocking clients), while the gateway and the fake upstream
run in the test's trio nursery.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import trio
from google import genai
from google.genai import types as genai_types

from tests.integration.harness import UPSTREAM_SECRET, Stack, running_stack
from trioproxy.testing.fake_upstream import FakeUpstream, FakeUsage

USAGE = FakeUsage(
    input_tokens=120, output_tokens=30, cache_read_tokens=20, cache_write_tokens=0, reasoning_tokens=5
)


def _fake() -> FakeUpstream:
    return FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), usage=USAGE, events=4)


def _openai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(api_key=stack.keys["openai"], base_url=stack.base_url + "/v1", max_retries=0)


def _anthropic(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=stack.keys["anthropic"], base_url=stack.base_url, max_retries=0)


def _genai(stack: Stack) -> genai.Client:
    return genai.Client(
        api_key=stack.keys["gemini"],
        http_options=genai_types.HttpOptions(base_url=stack.base_url, timeout=10_000),
    )


async def _in_thread(fn: Any) -> Any:
    return await trio.to_thread.run_sync(fn)


def _assert_upstream_saw_only_pooled_key(stack: Stack, gateway_key: str) -> None:
    assert stack.fake.captured, "the fake upstream saw no request"
    for captured in stack.fake.captured:
        flat = " ".join(f"{k}: {v}" for k, v in captured.headers) + " " + captured.target
        assert gateway_key not in flat
        assert UPSTREAM_SECRET in flat


async def test_openai_chat_non_stream(tmp_path: Path) -> None:
    async with running_stack(tmp_path, fake=_fake()) as stack:
        with _openai(stack) as client:
            completion = await _in_thread(
                lambda: client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            )
            assert completion.choices[0].message.content
            assert completion.usage is not None
            assert completion.usage.prompt_tokens == USAGE.input_tokens + USAGE.cache_read_tokens
            [row] = await stack.rows(1)
            _assert_upstream_saw_only_pooled_key(stack, stack.keys["openai"])
    assert row["route"] == "openai.chat_completions"
    assert row["status"] == 200
    assert row["outcome"] == "ok"
    assert row["stream"] is False
    assert row["model"] == "gpt-4o-mini"
    assert row["input_tokens"] == USAGE.input_tokens
    assert row["cache_read_tokens"] == USAGE.cache_read_tokens
    assert row["output_tokens"] == USAGE.output_tokens
    assert row["reasoning_tokens"] == USAGE.reasoning_tokens
    # gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per million tokens.
    expected = (
        Decimal(USAGE.input_tokens) * Decimal("0.15")
        + Decimal(USAGE.cache_read_tokens) * Decimal("0.075")
        + Decimal(USAGE.output_tokens) * Decimal("0.60")
    ) / Decimal(1_000_000)
    assert Decimal(row["cost_total"]) == expected
    assert row["price_missing"] is False


@pytest.mark.parametrize("client_asks_usage", [False, True])
async def test_openai_chat_stream_usage_chunk_only_when_asked(
    tmp_path: Path, client_asks_usage: bool
) -> None:
    async with running_stack(tmp_path, fake=_fake()) as stack:
        with _openai(stack) as client:
            extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_asks_usage else {}

            def consume() -> list[Any]:
                stream = client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True, **extra
                )
                return list(stream)

            chunks = await _in_thread(consume)
            [row] = await stack.rows(1)
            upstream_body = stack.fake.captured[-1].body
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage_chunks = [c for c in chunks if c.usage is not None]
    if client_asks_usage:
        assert len(usage_chunks) == 1
        assert usage_chunks[0].choices == []
    else:
        assert usage_chunks == []
        assert all(not c.model_extra or "usage" not in c.model_extra for c in chunks)
    assert b'"include_usage":true' in upstream_body.replace(b" ", b"")
    assert row["stream"] is True
    assert row["outcome"] == "ok"
    assert row["usage_partial"] is False
    assert row["input_tokens"] == USAGE.input_tokens
    assert row["output_tokens"] == USAGE.output_tokens
    assert row["cost_total"] is not None


async def test_openai_embeddings_models_and_responses(tmp_path: Path) -> None:
    async with running_stack(tmp_path, fake=_fake()) as stack:
        with _openai(stack) as client:
            embedding = await _in_thread(
                lambda: client.embeddings.create(model="text-embedding-3-small", input="hello")
            )
            assert embedding.data and embedding.data[0].embedding
            models = await _in_thread(lambda: list(client.models.list()))
            assert models
            response = await _in_thread(lambda: client.responses.create(model="gpt-4.1", input="hi"))
            assert response.output_text

            def stream_response() -> list[Any]:
                with client.responses.stream(model="gpt-4.1", input="hi") as stream:
                    events = list(stream)
                    stream.get_final_response()
                return events

            events = await _in_thread(stream_response)
            assert any(e.type == "response.completed" for e in events)
            rows = await stack.rows(4)
    by_route: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_route.setdefault(row["route"], []).append(row)
    assert by_route["openai.embeddings"][0]["input_tokens"] > 0
    assert by_route["openai.models"][0]["status"] == 200
    assert by_route["openai.models"][0]["cost_total"] is None
    assert by_route["openai.models"][0]["price_missing"] is False
    for row in by_route["openai.responses"]:
        assert row["outcome"] == "ok"
        assert row["output_tokens"] == USAGE.output_tokens
    assert {r["stream"] for r in by_route["openai.responses"]} == {True, False}


async def test_anthropic_messages_stream_and_non_stream(tmp_path: Path) -> None:
    usage = FakeUsage(input_tokens=50, output_tokens=25, cache_read_tokens=10, cache_write_tokens=8)
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), usage=usage, events=3)
    async with running_stack(tmp_path, fake=fake) as stack:
        with _anthropic(stack) as client:
            message = await _in_thread(
                lambda: client.messages.create(
                    model="claude-haiku-4-5",
                    max_tokens=64,
                    messages=[{"role": "user", "content": "hi"}],
                )
            )
            assert message.content[0].type == "text"

            def stream() -> str:
                with client.messages.stream(
                    model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                ) as s:
                    text = "".join(s.text_stream)
                    final = s.get_final_message()
                assert final.usage.output_tokens == usage.output_tokens
                return text

            assert await _in_thread(stream)
            count = await _in_thread(
                lambda: client.messages.count_tokens(
                    model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}]
                )
            )
            assert count.input_tokens > 0
            rows = await stack.rows(3)
            headers = dict(stack.fake.captured[0].headers)
    assert headers["x-api-key"] == UPSTREAM_SECRET
    assert "anthropic-version" in headers
    count_row, stream_row, plain_row = rows
    assert count_row["route"] == "anthropic.count_tokens"
    assert count_row["cost_total"] is None
    for row in (stream_row, plain_row):
        assert row["route"] == "anthropic.messages"
        assert row["outcome"] == "ok"
        assert row["input_tokens"] == usage.input_tokens
        assert row["output_tokens"] == usage.output_tokens
        assert row["cache_read_tokens"] == usage.cache_read_tokens
        assert row["cache_write_tokens"] == usage.cache_write_tokens
    # claude-haiku-4-5: $1 input, $5 output, $0.10 cache read, $1.25 cache write per million.
    expected = (
        Decimal(50) * 1 + Decimal(25) * 5 + Decimal(10) * Decimal("0.10") + Decimal(8) * Decimal("1.25")
    ) / Decimal(1_000_000)
    assert Decimal(stream_row["cost_total"]) == expected
    assert stream_row["stream"] is True and plain_row["stream"] is False


async def test_gemini_generate_stream_embed_and_models(tmp_path: Path) -> None:
    usage = FakeUsage(input_tokens=40, output_tokens=12, cache_read_tokens=0, reasoning_tokens=6)
    fake = FakeUpstream(accepted_keys=(UPSTREAM_SECRET,), usage=usage, events=3)
    async with running_stack(tmp_path, fake=fake) as stack:
        client = _genai(stack)
        result = await _in_thread(
            lambda: client.models.generate_content(model="gemini-2.5-flash", contents="hi")
        )
        assert result.text

        def stream() -> str:
            return "".join(
                chunk.text or ""
                for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")
            )

        assert await _in_thread(stream)
        embedded = await _in_thread(
            lambda: client.models.embed_content(model="gemini-embedding-001", contents="hello")
        )
        assert embedded.embeddings
        listed = await _in_thread(lambda: list(client.models.list()))
        assert listed
        rows = await stack.rows(4)
        captured = list(stack.fake.captured)
    for request in captured:
        assert "key=" not in request.query
        assert dict(request.headers)["x-goog-api-key"] == UPSTREAM_SECRET
    generate_rows = [r for r in rows if r["route"].startswith("gemini.") and "generate" in r["route"]]
    assert len(generate_rows) == 2
    for row in generate_rows:
        assert row["model"] == "gemini-2.5-flash"
        assert row["outcome"] == "ok"
        assert row["input_tokens"] == usage.input_tokens
        assert row["output_tokens"] == usage.output_tokens
        assert row["reasoning_tokens"] == usage.reasoning_tokens
        assert row["cost_total"] is not None
    assert {r["stream"] for r in generate_rows} == {True, False}
