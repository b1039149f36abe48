"""The fake upstream's OpenAI: chat completions, completions, embeddings, the Responses API and model lists.

Pure builders (no I/O): see :mod:`trioproxy.testing.fake_payloads` for the conventions they share.
"""

from __future__ import annotations

import json
from typing import Any

from trioproxy.testing.fake_payloads import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    OPENAI_MODELS,
    SYSTEM_FINGERPRINT,
    Call,
    Dialect,
    FakeUsage,
    JSONObject,
    Reply,
    compact,
    data_event,
    embedding_vector,
    error_reply,
    float32_base64,
    inband_error_frames,
    json_reply,
    named_event,
    stream_reply,
)


def openai_usage(usage: FakeUsage) -> JSONObject:
    """The ``usage`` object of chat completions and completions."""
    prompt_details: JSONObject = {"cached_tokens": usage.cache_read_tokens, "audio_tokens": 0}
    if usage.cache_write_tokens:
        prompt_details["cache_write_tokens"] = usage.cache_write_tokens
    return {
        "prompt_tokens": usage.openai_prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.openai_prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(body: JSONObject) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_chat(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/chat/completions``: a chat.completion object, or its chat.completion.chunk stream."""
    cid = f"chatcmpl-Fake{call.seq:020d}"
    if body.get("stream") is not True:
        completion = {
            "id": cid,
            "object": "chat.completion",
            "created": call.now,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": call.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": openai_usage(call.usage),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return json_reply(200, compact(completion))
    with_usage = _include_usage(body)

    def chunk(choices: list[JSONObject], usage: JSONObject | None = None) -> bytes:
        obj: JSONObject = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": call.now,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if with_usage:  # with include_usage every chunk carries "usage": null except the last one
            obj["usage"] = usage
        return data_event(compact(obj))

    def choice(delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    frames = [chunk([choice({"role": "assistant", "content": "", "refusal": None})])]
    frames += [chunk([choice({"content": piece})]) for piece in call.pieces]
    frames.append(chunk([choice({}, "stop")]))
    if with_usage:
        frames.append(chunk([], openai_usage(call.usage)))
    frames.append(b"data: [DONE]\n\n")
    return stream_reply(frames, inband_error_frames(Dialect.OPENAI))


def openai_completions(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/completions`` (legacy): a text_completion object, or its stream."""
    cid = f"cmpl-Fake{call.seq:020d}"

    def completion(choices: list[JSONObject], usage: JSONObject | None, with_usage: bool) -> JSONObject:
        obj: JSONObject = {
            "id": cid,
            "object": "text_completion",
            "created": call.now,
            "model": model,
            "choices": choices,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if with_usage:
            obj["usage"] = usage
        return obj

    def choice(text: str, finish: str | None) -> JSONObject:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if body.get("stream") is not True:
        return json_reply(
            200, compact(completion([choice(call.text, "stop")], openai_usage(call.usage), True))
        )
    with_usage = _include_usage(body)
    frames = [
        data_event(compact(completion([choice(piece, None)], None, with_usage))) for piece in call.pieces
    ]
    frames.append(data_event(compact(completion([choice("", "stop")], None, with_usage))))
    if with_usage:
        frames.append(data_event(compact(completion([], openai_usage(call.usage), True))))
    frames.append(b"data: [DONE]\n\n")
    return stream_reply(frames, inband_error_frames(Dialect.OPENAI))


def _openai_embedding_inputs(raw: Any) -> list[str] | None:
    """The embedding inputs as keys: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(item, int) for item in raw):
            return [json.dumps(raw)]
        if all(isinstance(item, str | list) for item in raw):
            return [item if isinstance(item, str) else json.dumps(item) for item in raw]
    return None


def openai_embeddings(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/embeddings`` with ``encoding_format`` float (the default) or base64."""
    inputs = _openai_embedding_inputs(body.get("input"))
    if inputs is None:
        return error_reply(Dialect.OPENAI, 400, "'input' must be a string or an array", code=None)
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions < 1:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, key in enumerate(inputs):
        vector = embedding_vector(key, index, dimensions)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": float32_base64(vector) if as_base64 else vector,
            }
        )
    tokens = call.usage.input_tokens
    payload = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json_reply(200, compact(payload))


def responses_usage(usage: FakeUsage) -> JSONObject:
    return {
        "input_tokens": usage.openai_prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.openai_prompt_tokens + usage.output_tokens,
    }


def openai_responses(call: Call, body: JSONObject, model: str) -> Reply:
    """``POST /v1/responses``: a response object, or the typed event stream ending in response.completed."""
    rid = f"resp_fake{call.seq:040x}"
    item_id = f"msg_fake{call.seq:040x}"
    part_done = {"type": "output_text", "annotations": [], "logprobs": [], "text": call.text}
    item_done = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "content": [part_done],
        "role": "assistant",
    }

    def response(status: str, output: list[JSONObject], usage: JSONObject | None) -> JSONObject:
        return {
            "id": rid,
            "object": "response",
            "created_at": call.now,
            "status": status,
            "background": False,
            "completed_at": call.now if status == "completed" else None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": None,
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": None,
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    if body.get("stream") is not True:
        return json_reply(200, compact(response("completed", [item_done], responses_usage(call.usage))))
    events: list[tuple[str, JSONObject]] = [
        ("response.created", {"response": response("in_progress", [], None)}),
        ("response.in_progress", {"response": response("in_progress", [], None)}),
        (
            "response.output_item.added",
            {
                "output_index": 0,
                "item": {
                    "id": item_id,
                    "type": "message",
                    "status": "in_progress",
                    "content": [],
                    "role": "assistant",
                },
            },
        ),
        (
            "response.content_part.added",
            {
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
            },
        ),
    ]
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events += [
        ("response.output_text.delta", {**where, "delta": piece, "logprobs": []}) for piece in call.pieces
    ]
    events += [
        ("response.output_text.done", {**where, "text": call.text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": part_done}),
        ("response.output_item.done", {"output_index": 0, "item": item_done}),
        ("response.completed", {"response": response("completed", [item_done], responses_usage(call.usage))}),
    ]
    frames = [
        named_event(name, compact({"type": name, "sequence_number": number, **fields}))
        for number, (name, fields) in enumerate(events)
    ]
    return stream_reply(frames, inband_error_frames(Dialect.OPENAI, responses_api=True))


def openai_model(model_id: str) -> JSONObject:
    return {"id": model_id, "object": "model", "created": 1686935002, "owned_by": "system"}


def openai_models(model_id: str | None) -> Reply:
    if model_id is not None:
        return json_reply(200, compact(openai_model(model_id)))
    return json_reply(200, compact({"object": "list", "data": [openai_model(m) for m in OPENAI_MODELS]}))
