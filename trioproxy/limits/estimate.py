"""What a request will cost, guessed before it is sent: the reservation admission holds (sans-IO).

The estimate should rather be high than low: with ``n`` requests in flight, a limit can be overshot by the sum of
their under-estimates, and by nothing when every estimate is an upper bound.

* Input: the UTF-8 bytes of every string in the body (keys included: tool schemas are prompt too) divided by
  :data:`BYTES_PER_TOKEN` (3, against the ~4 of English text, the ~3 of code and the ~1 token per 3-byte CJK
  character of today's tokenizers), plus :data:`INLINE_MEDIA_TOKENS` per inline image, audio or file part
  (``data:`` URLs, base64 ``data`` fields), whose base64 size says nothing about their token count.
* Output: the request's own cap (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``, Gemini's
  ``generationConfig.maxOutputTokens``) times the number of choices (``n``, ``candidateCount``), or
  ``default_output_tokens`` when it sets none. Routes that generate nothing (embeddings, token counting) have
  no output.
* Cost: the estimate priced at the model's input and output prices (cache discounts can only lower the real
  cost); None when the model has no price.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from trioproxy.pricing import PriceTable
from trioproxy.records import Usage
from trioproxy.snapshot import ProviderKind

BYTES_PER_TOKEN = 3
# An image costs 85-1,600 tokens at OpenAI and up to ~1,600 at Anthropic (1.15 megapixels); Gemini 258 per tile.
INLINE_MEDIA_TOKENS = 1_600
# Keys whose string value is base64 payload (Anthropic/Gemini "data", OpenAI audio "data", image "b64_json").
_PAYLOAD_KEYS = frozenset({"data", "b64_json", "file_data", "bytes"})
_OUTPUT_CAPS = ("max_completion_tokens", "max_output_tokens", "max_tokens", "maxOutputTokens")
_CHOICES = ("n", "candidateCount", "candidate_count")


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    input_tokens: int
    output_tokens: int

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def estimate_tokens(
    body: Mapping[str, Any], *, generates: bool = True, default_output_tokens: int = 4096
) -> TokenEstimate:
    """The estimate for a parsed JSON request body."""
    text_bytes, media = _prompt_size(body)
    input_tokens = math.ceil(text_bytes / BYTES_PER_TOKEN) + media * INLINE_MEDIA_TOKENS
    output_tokens = _output_cap(body, default_output_tokens) if generates else 0
    return TokenEstimate(input_tokens, output_tokens)


def estimate_cost(
    prices: PriceTable, kind: ProviderKind, model: str | None, estimate: TokenEstimate
) -> Decimal | None:
    cost = prices.cost(
        kind, model, Usage(input_tokens=estimate.input_tokens, output_tokens=estimate.output_tokens)
    )
    return None if cost is None else cost.total


def usage_tokens(usage: Usage) -> int:
    """The tokens a request used, as limits count them: every token the provider processed or produced."""
    return usage.input_tokens + usage.output_tokens + usage.cache_read_tokens + usage.cache_write_tokens


def _prompt_size(body: Mapping[str, Any]) -> tuple[int, int]:
    """(UTF-8 bytes of text, inline media parts); iterative, so nesting depth costs no stack."""
    text = 0
    media = 0
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item.startswith("data:"):
                media += 1
            else:
                text += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, Mapping):
            for key, value in item.items():
                if key in _PAYLOAD_KEYS and isinstance(value, str):
                    media += 1
                    continue
                if isinstance(key, str):
                    text += len(key)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return text, media


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _output_cap(body: Mapping[str, Any], default: int) -> int:
    config = body.get("generationConfig") or body.get("generation_config")
    sources = [body, config] if isinstance(config, Mapping) else [body]
    caps = (_positive_int(source.get(name)) for source in sources for name in _OUTPUT_CAPS)
    cap = next((value for value in caps if value is not None), default)
    counts = (_positive_int(source.get(name)) for source in sources for name in _CHOICES)
    choices = next((value for value in counts if value is not None), 1)
    return cap * choices
