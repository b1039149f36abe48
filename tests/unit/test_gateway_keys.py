"""Gateway key format: generation, checksum rejection, hashing and the displayable prefix."""

from __future__ import annotations

import hashlib
import re

from hypothesis import given
from hypothesis import strategies as st

from trioproxy.gateway_keys import (
    BASE62,
    BODY_CHARS,
    KEY_LENGTH,
    PREFIX,
    checksum,
    display_prefix,
    generate_gateway_key,
    has_valid_checksum,
    hash_gateway_key,
)

bodies = st.text(alphabet=BASE62, min_size=BODY_CHARS, max_size=BODY_CHARS)
KEY_RE = re.compile(r"tpk_[0-9A-Za-z]{38}")


def make_key(body: str) -> str:
    return PREFIX + body + checksum(PREFIX + body)


def test_generated_key_shape_and_checksum() -> None:
    key = generate_gateway_key()
    assert KEY_RE.fullmatch(key)
    assert len(key) == KEY_LENGTH == 42
    assert has_valid_checksum(key)


def test_generated_keys_differ() -> None:
    keys = {generate_gateway_key() for _ in range(200)}
    assert len(keys) == 200


@given(bodies)
def test_any_body_with_its_checksum_is_valid(body: str) -> None:
    assert has_valid_checksum(make_key(body))


@given(bodies, st.data())
def test_checksum_catches_every_single_character_change(body: str, data: st.DataObject) -> None:
    key = make_key(body)
    position = data.draw(st.integers(min_value=0, max_value=len(key) - 1), label="position")
    replacement = data.draw(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E).filter(lambda c: c != key[position]),
        label="replacement",
    )
    changed = key[:position] + replacement + key[position + 1 :]
    assert not has_valid_checksum(changed)


@given(bodies, st.integers(min_value=len(PREFIX), max_value=len(PREFIX) + BODY_CHARS - 2))
def test_checksum_catches_adjacent_transpositions(body: str, position: int) -> None:
    key = make_key(body)
    if key[position] == key[position + 1]:
        return
    swapped = key[:position] + key[position + 1] + key[position] + key[position + 2 :]
    assert not has_valid_checksum(swapped)


@given(bodies)
def test_truncated_or_extended_keys_are_rejected(body: str) -> None:
    key = make_key(body)
    assert not has_valid_checksum(key[:-1])
    assert not has_valid_checksum(key + "a")
    assert not has_valid_checksum(" " + key[1:])
    assert not has_valid_checksum("sk-" + key[3:])


@given(st.text(max_size=60))
def test_arbitrary_text_never_crashes(text: str) -> None:
    assert has_valid_checksum(text) in (True, False)


def test_hash_is_sha256_hex() -> None:
    key = generate_gateway_key()
    assert hash_gateway_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_gateway_key(key))


def test_display_prefix_reveals_only_the_start() -> None:
    key = generate_gateway_key()
    shown = display_prefix(key)
    assert shown.startswith(PREFIX)
    assert shown.endswith("…")
    assert key.startswith(shown[:-1])
    assert len(shown) - 1 <= len(key) // 3
