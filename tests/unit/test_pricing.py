"""PriceTable: exact Decimal costs per provider, cache and long-context tiers, and name resolution."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.pricing import SEED_ALIASES, SEED_PRICES, ModelPrice, PriceTable, PriceTier
from trioproxy.records import CostBreakdown, Usage
from trioproxy.snapshot import ProviderKind

OPENAI, ANTHROPIC, GEMINI = ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.GEMINI
D = Decimal


@pytest.fixture
def table() -> PriceTable:
    return PriceTable(SEED_PRICES)


def cost(
    table: PriceTable,
    kind: ProviderKind,
    model: str | None,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> CostBreakdown:
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens,
        cache_write_tokens=cache_write_tokens,
        reasoning_tokens=reasoning_tokens,
        reported=True,
    )
    result = table.cost(kind, model, usage)
    assert result is not None
    return result


# -- exact costs ---------------------------------------------------------------------------------------------


def test_openai_with_cached_input(table: PriceTable) -> None:
    c = cost(table, OPENAI, "gpt-4o", input_tokens=1000, cache_read_tokens=500, output_tokens=200)
    assert c == CostBreakdown(
        input=D("0.0025"), output=D("0.002"), cache_read=D("0.000625"), cache_write=D(0)
    )
    assert c.total == D("0.005125")


def test_openai_reasoning_tokens_are_already_in_output(table: PriceTable) -> None:
    c = cost(table, OPENAI, "o4-mini", input_tokens=100, output_tokens=1000, reasoning_tokens=800)
    assert c.output == D("0.0044")
    assert c.input == D("0.00011")


def test_openai_embedding(table: PriceTable) -> None:
    c = cost(table, OPENAI, "text-embedding-3-small", input_tokens=1_000_000)
    assert c.total == D("0.02")


def test_anthropic_with_cache_write_and_read(table: PriceTable) -> None:
    c = cost(
        table,
        ANTHROPIC,
        "claude-sonnet-4-5-20250929",
        input_tokens=1000,
        cache_write_tokens=2000,
        cache_read_tokens=10_000,
        output_tokens=500,
    )
    assert c == CostBreakdown(
        input=D("0.003"), output=D("0.0075"), cache_read=D("0.003"), cache_write=D("0.0075")
    )
    assert c.total == D("0.021")


def test_anthropic_cache_multipliers_hold_for_every_seed_model() -> None:
    for price in SEED_PRICES:
        # Claude 3 Haiku's published cache prices are rounded ($0.30 write, $0.03 read on $0.25 input).
        if price.provider_kind is ANTHROPIC and price.model != "claude-3-haiku":
            assert price.cache_write_per_million == price.input_per_million * D("1.25"), price.model
            assert price.cache_read_per_million == price.input_per_million * D("0.1"), price.model


def test_anthropic_long_context_tier_prices_the_whole_request(table: PriceTable) -> None:
    # prompt = 150,000 + 50,001 = 200,001 > 200k: every token at the long-context rates
    c = cost(
        table,
        ANTHROPIC,
        "claude-sonnet-4-20250514",
        input_tokens=150_000,
        cache_read_tokens=50_001,
        output_tokens=1000,
    )
    assert c == CostBreakdown(input=D("0.9"), output=D("0.0225"), cache_read=D("0.0300006"), cache_write=D(0))


def test_anthropic_tier_counts_cache_writes_in_the_prompt(table: PriceTable) -> None:
    base = cost(table, ANTHROPIC, "claude-sonnet-4-5", input_tokens=100, cache_write_tokens=200_000)
    assert base.input == D("0.0006")  # 200,100 > 200k -> $6/MTok
    assert base.cache_write == D("1.5")  # 200,000 x $7.50/MTok


def test_tier_boundary_is_exclusive(table: PriceTable) -> None:
    at = cost(table, GEMINI, "gemini-2.5-pro", input_tokens=200_000, output_tokens=1000)
    above = cost(table, GEMINI, "gemini-2.5-pro", input_tokens=200_001, output_tokens=1000)
    assert at == CostBreakdown(input=D("0.25"), output=D("0.01"), cache_read=D(0), cache_write=D(0))
    assert above == CostBreakdown(input=D("0.5000025"), output=D("0.015"), cache_read=D(0), cache_write=D(0))


def test_gemini_pro_short_and_long(table: PriceTable) -> None:
    short = cost(table, GEMINI, "gemini-2.5-pro", input_tokens=100_000, output_tokens=50_000)
    assert short.total == D("0.625")
    long = cost(
        table, GEMINI, "gemini-2.5-pro", input_tokens=250_000, cache_read_tokens=50_000, output_tokens=10
    )
    assert long == CostBreakdown(
        input=D("0.625"), output=D("0.00015"), cache_read=D("0.0125"), cache_write=D(0)
    )


def test_gemini_flash_with_cache(table: PriceTable) -> None:
    c = cost(
        table, GEMINI, "models/gemini-2.5-flash", input_tokens=4000, cache_read_tokens=6000, output_tokens=300
    )
    assert c == CostBreakdown(
        input=D("0.0012"), output=D("0.00075"), cache_read=D("0.00018"), cache_write=D(0)
    )


def test_unoffered_cache_tokens_are_priced_as_input(table: PriceTable) -> None:
    # OpenAI sells no cache writes; Gemini 2.0 Flash-Lite no cache reads: such tokens cost the input price.
    c = cost(table, OPENAI, "gpt-4o", cache_write_tokens=100)
    assert c.cache_write == D("0.00025")
    c = cost(table, GEMINI, "gemini-2.0-flash-lite", cache_read_tokens=1000)
    assert c.cache_read == D("0.000075")


def test_full_precision_no_rounding(table: PriceTable) -> None:
    c = cost(table, OPENAI, "gpt-5-nano", cache_read_tokens=7, input_tokens=1, output_tokens=3)
    assert c.cache_read == D("0.000000035")
    assert c.input == D("0.00000005")
    assert c.output == D("0.0000012")
    assert c.total == D("0.000001285")


def test_zero_usage_costs_zero(table: PriceTable) -> None:
    assert cost(table, OPENAI, "gpt-4.1").total == 0


def test_free_model_costs_zero_not_none(table: PriceTable) -> None:
    assert cost(table, GEMINI, "text-embedding-004", input_tokens=5000).total == 0


# -- resolution ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        (OPENAI, "gpt-4o", "gpt-4o"),
        (OPENAI, "gpt-4o-2024-08-06", "gpt-4o"),
        (OPENAI, "gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # exact beats normalisation
        (OPENAI, "gpt-4o-mini", "gpt-4o-mini"),
        (OPENAI, "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # never the shorter gpt-4o
        (OPENAI, "gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        (OPENAI, "o3-2025-04-16", "o3"),
        (OPENAI, "gpt-5-2025-08-07", "gpt-5"),
        (OPENAI, "gpt-5-mini-2025-08-07", "gpt-5-mini"),
        (OPENAI, "gpt-5-chat-latest", "gpt-5-chat"),
        (OPENAI, "GPT-4o", "gpt-4o"),
        (ANTHROPIC, "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        (ANTHROPIC, "claude-sonnet-4-20250514", "claude-sonnet-4"),
        (ANTHROPIC, "claude-opus-4-1-20250805", "claude-opus-4-1"),
        (ANTHROPIC, "claude-opus-4-20250514", "claude-opus-4"),
        (ANTHROPIC, "claude-opus-4-0", "claude-opus-4"),
        (ANTHROPIC, "claude-sonnet-4-0", "claude-sonnet-4"),
        (ANTHROPIC, "claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        (ANTHROPIC, "claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        (ANTHROPIC, "claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        (ANTHROPIC, "claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
        (ANTHROPIC, "claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        (ANTHROPIC, "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        (GEMINI, "gemini-2.5-flash", "gemini-2.5-flash"),
        (GEMINI, "models/gemini-2.5-flash", "gemini-2.5-flash"),
        (GEMINI, "models/gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
        (GEMINI, "gemini-2.0-flash-001", "gemini-2.0-flash"),
        (GEMINI, "gemini-2.0-flash-lite-001", "gemini-2.0-flash-lite"),
        (GEMINI, "gemini-embedding-001", "gemini-embedding-001"),
    ],
)
def test_resolve(table: PriceTable, kind: ProviderKind, name: str, expected: str) -> None:
    price = table.resolve(kind, name)
    assert price is not None, name
    assert price.model == expected
    assert price.provider_kind is kind


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (OPENAI, "gpt-4o-mini-transcribe"),  # a prefix of a known name is not that name
        (OPENAI, "gpt-4"),
        (OPENAI, "chatgpt-4o-latest"),
        (OPENAI, "gpt-4o-realtime-preview"),
        (OPENAI, "ft:gpt-4o-mini:org::abc"),
        (OPENAI, "claude-sonnet-4-5"),  # a known model under the wrong provider
        (ANTHROPIC, "gpt-4o"),
        (ANTHROPIC, "claude-sonnet-4-5-extra"),
        (GEMINI, "gemini-2.5-flash-preview-05-20"),  # previews are priced separately by Google
        (GEMINI, "tunedModels/my-model"),
        (GEMINI, "gemini-9"),
        (GEMINI, ""),
    ],
)
def test_unknown_models_have_no_price(table: PriceTable, kind: ProviderKind, name: str) -> None:
    assert table.resolve(kind, name) is None
    assert table.cost(kind, name, Usage(input_tokens=10, reported=True)) is None


def test_no_model_no_cost(table: PriceTable) -> None:
    assert table.cost(OPENAI, None, Usage(input_tokens=10)) is None


def test_custom_table_and_aliases() -> None:
    price = ModelPrice("house-model", OPENAI, D("1"), D("2"), None, None)
    t = PriceTable([price], aliases={"house": "house-model"})
    assert t.resolve(OPENAI, "house") is price
    assert t.resolve(OPENAI, "house-2025-01-01") is price
    assert t.resolve(OPENAI, "gpt-4o") is None
    assert len(t) == 1
    assert "1 models" in repr(t)


def test_multiple_tiers_pick_the_highest_exceeded() -> None:
    price = ModelPrice(
        "m",
        OPENAI,
        D("1"),
        D("1"),
        None,
        None,
        tiers=(PriceTier(1000, D("3"), D("3"), None, None), PriceTier(100, D("2"), D("2"), None, None)),
    )
    t = PriceTable([price])
    assert cost(t, OPENAI, "m", input_tokens=100).input == D("0.0001")
    assert cost(t, OPENAI, "m", input_tokens=101).input == D("0.000202")
    assert cost(t, OPENAI, "m", input_tokens=1001).input == D("0.003003")


# -- seed data -----------------------------------------------------------------------------------------------


def test_seed_names_are_unique_and_aliases_point_at_seeds() -> None:
    keys = [(p.provider_kind, p.model) for p in SEED_PRICES]
    assert len(keys) == len(set(keys))
    names = {p.model for p in SEED_PRICES}
    assert set(SEED_ALIASES.values()) <= names


@pytest.mark.parametrize(
    ("kind", "model"),
    [
        (OPENAI, m)
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "o3",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano",
            "text-embedding-3-small",
            "text-embedding-3-large",
        ]
    ]
    + [
        (ANTHROPIC, m)
        for m in [
            "claude-opus-4-1",
            "claude-opus-4",
            "claude-sonnet-4-5",
            "claude-sonnet-4",
            "claude-3-7-sonnet",
            "claude-3-5-haiku",
            "claude-haiku-4-5",
        ]
    ]
    + [
        (GEMINI, m)
        for m in [
            "gemini-2.5-pro",
            "gemini-2.5-flash",
            "gemini-2.5-flash-lite",
            "gemini-2.0-flash",
            "text-embedding-004",
            "gemini-embedding-001",
        ]
    ],
)
def test_required_seed_models_present(table: PriceTable, kind: ProviderKind, model: str) -> None:
    assert table.resolve(kind, model) is not None


def test_seed_prices_are_sane() -> None:
    for p in SEED_PRICES:
        assert p.input_per_million >= 0
        assert p.output_per_million >= 0
        for cache in (p.cache_read_per_million, p.cache_write_per_million):
            assert cache is None or cache >= 0
        if p.cache_read_per_million is not None:
            assert p.cache_read_per_million <= p.input_per_million, p.model


# -- properties ----------------------------------------------------------------------------------------------

TOKENS = st.integers(min_value=0, max_value=2_000_000)


@settings(max_examples=examples(200))
@given(
    price=st.sampled_from(SEED_PRICES),
    i=TOKENS,
    o=TOKENS,
    cr=TOKENS,
    cw=TOKENS,
)
def test_property_total_is_exact_sum_and_linear_within_a_tier(
    price: ModelPrice, i: int, o: int, cr: int, cw: int
) -> None:
    t = PriceTable(SEED_PRICES)
    usage = Usage(input_tokens=i, output_tokens=o, cache_read_tokens=cr, cache_write_tokens=cw)
    c = t.cost(price.provider_kind, price.model, usage)
    assert c is not None
    assert c.total == c.input + c.output + c.cache_read + c.cache_write
    assert min(c.input, c.output, c.cache_read, c.cache_write) >= 0
    tier = price.tier_for(i + cr + cw)
    assert c.input == i * tier.input_per_million / 1_000_000
    assert c.output * 1_000_000 == o * tier.output_per_million
