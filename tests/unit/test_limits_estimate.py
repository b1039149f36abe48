"""Token and cost estimates from request bodies of the three dialects."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from trioproxy.limits.estimate import (
    BYTES_PER_TOKEN,
    INLINE_MEDIA_TOKENS,
    TokenEstimate,
    estimate_cost,
    estimate_tokens,
    usage_tokens,
)
from trioproxy.pricing import SEED_PRICES, PriceTable
from trioproxy.records import Usage
from trioproxy.snapshot import ProviderKind


def test_openai_chat_uses_max_completion_tokens_times_n() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "x" * 300}],
        "max_completion_tokens": 50,
        "n": 2,
    }
    estimate = estimate_tokens(body)
    assert estimate.output_tokens == 100
    # 300 bytes of content plus keys and short values, at 3 bytes per token.
    assert 100 <= estimate.input_tokens <= 120


def test_output_caps_of_each_dialect() -> None:
    assert estimate_tokens({"max_tokens": 77}).output_tokens == 77  # Anthropic, legacy OpenAI
    assert estimate_tokens({"max_output_tokens": 66}).output_tokens == 66  # OpenAI Responses
    assert (
        estimate_tokens({"generationConfig": {"maxOutputTokens": 55, "candidateCount": 3}}).output_tokens
        == 165
    )
    assert estimate_tokens({"messages": []}, default_output_tokens=1234).output_tokens == 1234
    assert estimate_tokens({"max_tokens": True}, default_output_tokens=9).output_tokens == 9  # not a number
    assert estimate_tokens({"input": "hello"}, generates=False).output_tokens == 0  # embeddings


def test_inline_media_costs_a_fixed_amount_not_its_base64_size() -> None:
    image = "data:image/png;base64," + "A" * 1_000_000
    openai = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}
    anthropic = {
        "messages": [{"content": [{"type": "image", "source": {"type": "base64", "data": "A" * 10**6}}]}]
    }
    gemini = {"contents": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": "A" * 10**6}}]}]}
    for body in (openai, anthropic, gemini):
        estimate = estimate_tokens(body, generates=False)
        assert INLINE_MEDIA_TOKENS <= estimate.input_tokens < INLINE_MEDIA_TOKENS + 100


@given(st.text(max_size=300))
def test_input_estimate_is_at_least_the_text_bytes_over_three(text: str) -> None:
    estimate = estimate_tokens({"messages": [{"content": text}]}, generates=False)
    size = len(text.encode("utf-8", "surrogatepass")) if not text.startswith("data:") else 0
    assert estimate.input_tokens * BYTES_PER_TOKEN >= size


def test_deeply_nested_bodies_do_not_recurse() -> None:
    body: dict[str, object] = {"v": "abc"}
    for _ in range(5000):
        body = {"v": body}
    assert estimate_tokens(body).input_tokens == 1668  # 5,001 keys "v" and "abc": 5,004 bytes


def test_cost_at_input_and_output_prices() -> None:
    prices = PriceTable(SEED_PRICES)
    cost = estimate_cost(prices, ProviderKind.OPENAI, "gpt-4o-2024-08-06", TokenEstimate(1_000_000, 100_000))
    assert cost == Decimal("2.50") + Decimal("1.00")
    assert estimate_cost(prices, ProviderKind.OPENAI, "unknown-model", TokenEstimate(1, 1)) is None
    assert estimate_cost(prices, ProviderKind.OPENAI, None, TokenEstimate(1, 1)) is None


def test_usage_tokens_counts_every_processed_token() -> None:
    usage = Usage(
        input_tokens=10, output_tokens=20, cache_read_tokens=30, cache_write_tokens=40, reasoning_tokens=5
    )
    assert usage_tokens(usage) == 100  # reasoning tokens are part of output already
