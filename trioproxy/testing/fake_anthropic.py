"""The fake upstream's Anthropic: messages (JSON and SSE), token counts and model lists.

Pure builders (no I/O): see :mod:`trioproxy.testing.fake_payloads` for the conventions they share.
"""

from __future__ import annotations

from trioproxy.testing.fake_payloads import (
    ANTHROPIC_MODELS,
    Call,
    Dialect,
    FakeUsage,
    JSONObject,
    Reply,
    compact,
    inband_error_frames,
    json_reply,
    named_event,
    stream_reply,
)


def anthropic_usage(usage: FakeUsage, output_tokens: int) -> JSONObject:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_write_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def anthropic_messages(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/messages``: a message object, or its event stream (message_start ... message_stop)."""
    mid = f"msg_01Fake{call.seq:016d}"

    def message(content: list[JSONObject], stop_reason: str | None, output_tokens: int) -> JSONObject:
        return {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": anthropic_usage(call.usage, output_tokens),
        }

    if body.get("stream") is not True:
        text_block = {"type": "text", "text": call.text}
        return json_reply(200, compact(message([text_block], "end_turn", call.usage.output_tokens)))
    usage = call.usage
    final_usage = {  # message_delta's usage is cumulative: the totals of the whole message
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "output_tokens": usage.output_tokens,
    }
    events: list[tuple[str, JSONObject]] = [
        ("message_start", {"type": "message_start", "message": message([], None, 1)}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
        )
        for piece in call.pieces
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": final_usage,
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    frames = [named_event(name, compact(obj)) for name, obj in events]
    return stream_reply(frames, inband_error_frames(Dialect.ANTHROPIC))


def anthropic_count_tokens(call: Call) -> Reply:
    return json_reply(200, compact({"input_tokens": call.usage.input_tokens}))


def anthropic_model(model_id: str) -> JSONObject:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id.rsplit("-", 1)[0].replace("-", " ").title(),
        "created_at": "2025-09-29T00:00:00Z",
    }


def anthropic_models(model_id: str | None) -> Reply:
    if model_id is not None:
        return json_reply(200, compact(anthropic_model(model_id)))
    page = {
        "data": [anthropic_model(m) for m in ANTHROPIC_MODELS],
        "has_more": False,
        "first_id": ANTHROPIC_MODELS[0],
        "last_id": ANTHROPIC_MODELS[-1],
    }
    return json_reply(200, compact(page))
