"""The fake upstream's Gemini: generateContent (JSON, SSE and JSON-array streams), token counts, embeddings and model lists.

Pure builders (no I/O): see :mod:`trioproxy.testing.fake_payloads` for the conventions they share.
"""

from __future__ import annotations

from trioproxy.testing.fake_payloads import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    GEMINI_MODELS,
    Call,
    Dialect,
    FakeUsage,
    JSONObject,
    Reply,
    compact,
    embedding_vector,
    error_reply,
    google_inline,
    google_pretty,
    inband_error_frames,
    json_reply,
)


def gemini_usage(usage: FakeUsage, *, final: bool) -> JSONObject:
    """usageMetadata; chunks before the last carry only the prompt side, as Gemini's early chunks do."""
    prompt = usage.gemini_prompt_tokens
    meta: JSONObject = {"promptTokenCount": prompt}
    candidates = usage.output_tokens - usage.reasoning_tokens
    if final:
        meta["candidatesTokenCount"] = candidates
    meta["totalTokenCount"] = prompt + (candidates + usage.reasoning_tokens if final else 0)
    if usage.cache_read_tokens:
        meta["cachedContentTokenCount"] = usage.cache_read_tokens
    meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if final and usage.reasoning_tokens:
        meta["thoughtsTokenCount"] = usage.reasoning_tokens
    return meta


def gemini_generate(call: Call, model: str, *, stream: bool, sse: bool) -> Reply:
    """``:generateContent`` / ``:streamGenerateContent`` (SSE with ``alt=sse``, else a JSON array stream)."""
    response_id = f"Fake{call.seq:020d}"

    def response(text: str, finish: bool) -> JSONObject:
        candidate: JSONObject = {"content": {"parts": [{"text": text}], "role": "model"}}
        if finish:
            candidate["finishReason"] = "STOP"
        candidate["index"] = 0
        return {
            "candidates": [candidate],
            "usageMetadata": gemini_usage(call.usage, final=finish),
            "modelVersion": model,
            "responseId": response_id,
        }

    json_type = "application/json; charset=UTF-8"
    if not stream:
        return json_reply(200, google_pretty(response(call.text, True)) + b"\n", json_type)
    last = len(call.pieces) - 1
    objects = [response(piece, i == last) for i, piece in enumerate(call.pieces)]
    if sse:
        frames = [b"data: " + google_inline(obj) + b"\r\n\r\n" for obj in objects]
        return Reply(
            200, "text/event-stream", frames=frames, inband_error=inband_error_frames(Dialect.GEMINI)
        )
    frames = [(b"[" if i == 0 else b"\n,\r\n") + google_pretty(obj) for i, obj in enumerate(objects)]
    frames.append(b"\n]")
    return Reply(200, json_type, frames=frames, inband_error=inband_error_frames(Dialect.GEMINI, sse=False))


def gemini_count_tokens(call: Call) -> Reply:
    count: JSONObject = {"totalTokens": call.usage.gemini_prompt_tokens}
    if call.usage.cache_read_tokens:
        count["cachedContentTokenCount"] = call.usage.cache_read_tokens
    count["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": call.usage.gemini_prompt_tokens}]
    return json_reply(200, google_pretty(count) + b"\n", "application/json; charset=UTF-8")


def _gemini_dimensions(request: JSONObject) -> int:
    dimensions = request.get("outputDimensionality")
    return dimensions if isinstance(dimensions, int) and dimensions > 0 else DEFAULT_EMBEDDING_DIMENSIONS


def gemini_embed(body: JSONObject, *, batch: bool) -> Reply:
    """``:embedContent`` ({embedding: {values}}) or ``:batchEmbedContents`` ({embeddings: [...]})."""
    json_type = "application/json; charset=UTF-8"
    if not batch:
        values = embedding_vector(compact(body.get("content")).decode(), 0, _gemini_dimensions(body))
        return json_reply(200, google_pretty({"embedding": {"values": values}}) + b"\n", json_type)
    requests = body.get("requests")
    if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
        return error_reply(Dialect.GEMINI, 400, "Invalid JSON payload: 'requests' must be a list.")
    embeddings = [
        {"values": embedding_vector(compact(r.get("content")).decode(), i, _gemini_dimensions(r))}
        for i, r in enumerate(requests)
    ]
    return json_reply(200, google_pretty({"embeddings": embeddings}) + b"\n", json_type)


def gemini_model(name: str) -> JSONObject:
    embedding = "embedding" in name
    methods = (
        ["embedContent", "countTextTokens", "countTokens"]
        if embedding
        else [
            "generateContent",
            "countTokens",
            "createCachedContent",
            "batchGenerateContent",
        ]
    )
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name.replace("-", " ").title(),
        "description": f"{name} served by the fake upstream",
        "inputTokenLimit": 2048 if embedding else 1048576,
        "outputTokenLimit": 1 if embedding else 65536,
        "supportedGenerationMethods": methods,
    }


def gemini_models(name: str | None) -> Reply:
    json_type = "application/json; charset=UTF-8"
    if name is not None:
        return json_reply(200, google_pretty(gemini_model(name)) + b"\n", json_type)
    return json_reply(
        200, google_pretty({"models": [gemini_model(m) for m in GEMINI_MODELS]}) + b"\n", json_type
    )
