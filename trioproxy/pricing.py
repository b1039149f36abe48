"""What a request cost: a price table and the arithmetic on a :class:`~trioproxy.records.Usage`.

Prices are USD per million tokens, kept as :class:`~decimal.Decimal` from the literal to the result: a
per-token price is ``per_million / 1_000_000`` and nothing is rounded here (the store decides how to keep it).

Lookup (:meth:`PriceTable.resolve`) is exact first, then through a few safe normalisations: a ``models/``
prefix (Gemini), a release date suffix (``-2024-08-06``, ``-20250514``, ``@20240620``), ``-latest``, and an
explicit alias map. Longest-prefix matching is deliberately absent: ``gpt-4o-mini-...`` must never be priced
as ``gpt-4o``. A model that matches nothing has no price (``None``), never a silent zero.

Tiers: some models charge more for long prompts, for *every* token of such a request (Gemini 2.5 Pro above
200k prompt tokens, Claude Sonnet 4/4.5 with the 1M context above 200k). The prompt size is input + cache read
+ cache write tokens; the tier with the highest ``min_input_tokens`` that the prompt size exceeds prices the
whole request.

Cache prices of ``None`` mean the provider does not sell that kind of token for the model; should usage still
report some, they are priced at the input rate (the price of the same tokens without a cache), so cost is
never understated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from trioproxy.records import CostBreakdown, Usage
from trioproxy.snapshot import ProviderKind

_MILLION = Decimal(1_000_000)
_DATE_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8})$")
_LATEST_SUFFIX = "-latest"
_MODELS_PREFIX = "models/"


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Prices for a request whose prompt is larger than ``min_input_tokens``."""

    min_input_tokens: int
    input_per_million: Decimal
    output_per_million: Decimal
    cache_read_per_million: Decimal | None
    cache_write_per_million: Decimal | None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    model: str
    provider_kind: ProviderKind
    input_per_million: Decimal
    output_per_million: Decimal
    cache_read_per_million: Decimal | None
    cache_write_per_million: Decimal | None
    tiers: tuple[PriceTier, ...] = ()

    def tier_for(self, prompt_tokens: int) -> PriceTier:
        """The prices for a request with ``prompt_tokens`` of prompt (the base prices as a tier of 0)."""
        chosen = PriceTier(
            0,
            self.input_per_million,
            self.output_per_million,
            self.cache_read_per_million,
            self.cache_write_per_million,
        )
        for tier in self.tiers:
            if prompt_tokens > tier.min_input_tokens and tier.min_input_tokens >= chosen.min_input_tokens:
                chosen = tier
        return chosen


class PriceTable:
    """Immutable lookup from (provider kind, model name) to price; built once per config snapshot."""

    def __init__(self, prices: Iterable[ModelPrice], *, aliases: Mapping[str, str] | None = None) -> None:
        self._prices: Mapping[tuple[ProviderKind, str], ModelPrice] = MappingProxyType(
            {(price.provider_kind, price.model): price for price in prices}
        )
        self._aliases: Mapping[str, str] = MappingProxyType(
            dict(SEED_ALIASES if aliases is None else aliases)
        )
        # Resolutions already made (the table never changes; a new snapshot builds a new table). Bounded: a
        # client could send many distinct model names, and each miss would stay.
        self._resolved: dict[tuple[ProviderKind, str], ModelPrice | None] = {}

    def __len__(self) -> int:
        return len(self._prices)

    def __reduce__(self) -> tuple[Any, ...]:
        # The prices and aliases travel (see Snapshot.__reduce__); resolutions are rebuilt on demand.
        return (_price_table, (list(self._prices.values()), dict(self._aliases)))

    def __repr__(self) -> str:
        return f"<PriceTable {len(self._prices)} models, {len(self._aliases)} aliases>"

    def resolve(self, kind: ProviderKind, model: str) -> ModelPrice | None:
        """The price of ``model`` for provider ``kind``; None when no form of the name is known."""
        key = (kind, model)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        price = self._resolve(kind, model)
        if len(self._resolved) < _RESOLVED_CACHE_SIZE:
            self._resolved[key] = price
        return price

    def _resolve(self, kind: ProviderKind, model: str) -> ModelPrice | None:
        for candidate in _candidates(model):
            for name in (candidate, self._aliases.get(candidate)):
                if name is not None:
                    price = self._prices.get((kind, name))
                    if price is not None:
                        return price
        return None

    def cost(self, kind: ProviderKind, model: str | None, usage: Usage) -> CostBreakdown | None:
        """The exact USD cost of ``usage`` on ``model``, or None when the model is unknown or unpriced."""
        if model is None:
            return None
        price = self.resolve(kind, model)
        if price is None:
            return None
        prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
        tier = price.tier_for(prompt)
        cache_read = (
            tier.cache_read_per_million if tier.cache_read_per_million is not None else tier.input_per_million
        )
        cache_write = (
            tier.cache_write_per_million
            if tier.cache_write_per_million is not None
            else tier.input_per_million
        )
        return CostBreakdown(
            input=usage.input_tokens * tier.input_per_million / _MILLION,
            output=usage.output_tokens * tier.output_per_million / _MILLION,
            cache_read=usage.cache_read_tokens * cache_read / _MILLION,
            cache_write=usage.cache_write_tokens * cache_write / _MILLION,
        )


_RESOLVED_CACHE_SIZE = 4096


def _candidates(model: str) -> list[str]:
    """``model`` and its normalised forms, most specific first, without repeats."""
    out = [model]
    name = model.strip().lower()
    if name.startswith(_MODELS_PREFIX):
        name = name[len(_MODELS_PREFIX) :]
    out.append(name)
    stripped = _DATE_SUFFIX.sub("", name)
    if stripped.endswith(_LATEST_SUFFIX):
        stripped = stripped[: -len(_LATEST_SUFFIX)]
    out.append(stripped)
    return list(dict.fromkeys(candidate for candidate in out if candidate))


def _price(
    kind: ProviderKind,
    model: str,
    input_: str,
    output: str,
    cache_read: str | None,
    cache_write: str | None,
    *tiers: PriceTier,
) -> ModelPrice:
    return ModelPrice(
        model=model,
        provider_kind=kind,
        input_per_million=Decimal(input_),
        output_per_million=Decimal(output),
        cache_read_per_million=None if cache_read is None else Decimal(cache_read),
        cache_write_per_million=None if cache_write is None else Decimal(cache_write),
        tiers=tiers,
    )


def _tier(above: int, input_: str, output: str, cache_read: str | None, cache_write: str | None) -> PriceTier:
    return PriceTier(
        min_input_tokens=above,
        input_per_million=Decimal(input_),
        output_per_million=Decimal(output),
        cache_read_per_million=None if cache_read is None else Decimal(cache_read),
        cache_write_per_million=None if cache_write is None else Decimal(cache_write),
    )


_O, _A, _G = ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.GEMINI

# Seed list prices, USD per 1M tokens, standard (non-batch, non-priority) processing, as published on
# platform.openai.com/docs/pricing, docs.anthropic.com/en/docs/about-claude/pricing and
# ai.google.dev/gemini-api/docs/pricing in late 2025 (cross-checked against the aipack-ai/aipack price data of
# early 2026). Operators edit prices in the admin plane; these only fill an empty table. OpenAI: cache_read is
# the "cached input" price; OpenAI sells no cache writes (None: priced as input, and OpenAI never reports
# any). Anthropic: cache_write is the 5-minute write (1.25x input), cache_read 0.1x input; Sonnet 4 and 4.5
# charge the long-context rates (2x input, 1.5x output) on every token once the prompt exceeds 200k. Gemini:
# the text/image/video input price (Gemini 2.5 Flash audio input costs more and is not told apart in usage);
# context caching storage is billed per hour, not per token, so cache_write is None.
SEED_PRICES: tuple[ModelPrice, ...] = (
    # --- OpenAI ---
    _price(_O, "gpt-4o", "2.50", "10.00", "1.25", None),
    _price(
        _O, "gpt-4o-2024-05-13", "5.00", "15.00", None, None
    ),  # the first gpt-4o snapshot kept its launch price
    _price(_O, "gpt-4o-mini", "0.15", "0.60", "0.075", None),
    _price(_O, "gpt-4.1", "2.00", "8.00", "0.50", None),
    _price(_O, "gpt-4.1-mini", "0.40", "1.60", "0.10", None),
    _price(_O, "gpt-4.1-nano", "0.10", "0.40", "0.025", None),
    _price(_O, "o1", "15.00", "60.00", "7.50", None),
    _price(_O, "o3", "2.00", "8.00", "0.50", None),
    _price(_O, "o3-mini", "1.10", "4.40", "0.55", None),
    _price(_O, "o4-mini", "1.10", "4.40", "0.275", None),
    _price(_O, "gpt-5", "1.25", "10.00", "0.125", None),
    _price(_O, "gpt-5-mini", "0.25", "2.00", "0.025", None),
    _price(_O, "gpt-5-nano", "0.05", "0.40", "0.005", None),
    _price(_O, "gpt-5-chat", "1.25", "10.00", "0.125", None),  # gpt-5-chat-latest
    _price(_O, "text-embedding-3-small", "0.02", "0", None, None),
    _price(_O, "text-embedding-3-large", "0.13", "0", None, None),
    _price(_O, "text-embedding-ada-002", "0.10", "0", None, None),
    # --- Anthropic ---
    _price(_A, "claude-opus-4-5", "5.00", "25.00", "0.50", "6.25"),
    _price(_A, "claude-opus-4-1", "15.00", "75.00", "1.50", "18.75"),
    _price(_A, "claude-opus-4", "15.00", "75.00", "1.50", "18.75"),
    _price(
        _A,
        "claude-sonnet-4-5",
        "3.00",
        "15.00",
        "0.30",
        "3.75",
        _tier(200_000, "6.00", "22.50", "0.60", "7.50"),
    ),
    _price(
        _A,
        "claude-sonnet-4",
        "3.00",
        "15.00",
        "0.30",
        "3.75",
        _tier(200_000, "6.00", "22.50", "0.60", "7.50"),
    ),
    _price(_A, "claude-3-7-sonnet", "3.00", "15.00", "0.30", "3.75"),
    _price(_A, "claude-3-5-sonnet", "3.00", "15.00", "0.30", "3.75"),
    _price(_A, "claude-haiku-4-5", "1.00", "5.00", "0.10", "1.25"),
    _price(_A, "claude-3-5-haiku", "0.80", "4.00", "0.08", "1.00"),
    _price(_A, "claude-3-haiku", "0.25", "1.25", "0.03", "0.30"),
    # --- Gemini ---
    _price(
        _G, "gemini-2.5-pro", "1.25", "10.00", "0.125", None, _tier(200_000, "2.50", "15.00", "0.25", None)
    ),
    _price(_G, "gemini-2.5-flash", "0.30", "2.50", "0.03", None),
    _price(_G, "gemini-2.5-flash-lite", "0.10", "0.40", "0.01", None),
    _price(_G, "gemini-2.0-flash", "0.10", "0.40", "0.025", None),
    _price(_G, "gemini-2.0-flash-lite", "0.075", "0.30", None, None),
    _price(_G, "gemini-embedding-001", "0.15", "0", None, None),
    _price(_G, "text-embedding-004", "0", "0", None, None),  # listed as free of charge on the Gemini API
)

# Names the normalisations cannot reach; the target must be a model of SEED_PRICES (for the same provider
# kind).
SEED_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "claude-opus-4-0": "claude-opus-4",
        "claude-sonnet-4-0": "claude-sonnet-4",
        "claude-3-5-sonnet-latest": "claude-3-5-sonnet",
        "claude-3-7-sonnet-latest": "claude-3-7-sonnet",
        "claude-3-5-haiku-latest": "claude-3-5-haiku",
        "gpt-5-chat-latest": "gpt-5-chat",
        "gemini-2.0-flash-001": "gemini-2.0-flash",
        "gemini-2.0-flash-lite-001": "gemini-2.0-flash-lite",
    }
)


def _price_table(prices: list[ModelPrice], aliases: dict[str, str]) -> PriceTable:
    return PriceTable(prices, aliases=aliases)
