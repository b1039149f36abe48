"""Secrets at rest: AES-256-GCM tokens, master key loading and creation, masking."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.crypto import (
    KEY_BYTES,
    KEY_FILE_NAME,
    PROVIDER_KEY_AAD,
    SecretBox,
    derive_key,
    load_or_create_master_key,
    mask_secret,
)
from trioproxy.errors import ConfigError
from trioproxy.settings import Settings

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@given(st.text(max_size=300))
def test_round_trip(plain: str) -> None:
    box = SecretBox(KEY)
    token = box.encrypt(plain)
    assert token.startswith("v1:")
    assert box.decrypt(token) == plain


@given(st.text(min_size=1, max_size=100), st.binary(max_size=40))
def test_round_trip_with_associated_data(plain: str, aad: bytes) -> None:
    box = SecretBox(KEY)
    assert box.decrypt(box.encrypt(plain, associated_data=aad), associated_data=aad) == plain


def test_same_plaintext_encrypts_differently_each_time() -> None:
    box = SecretBox(KEY)
    tokens = {box.encrypt("sk-same") for _ in range(50)}
    assert len(tokens) == 50


def test_token_is_base64url_of_nonce_and_ciphertext() -> None:
    token = SecretBox(KEY).encrypt("abc")
    blob = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))
    assert len(blob) == 12 + 3 + 16  # nonce + plaintext + GCM tag
    assert "abc" not in token


def test_wrong_key_fails_without_leaking() -> None:
    token = SecretBox(KEY).encrypt("sk-very-secret-value")
    with pytest.raises(ConfigError) as info:
        SecretBox(OTHER_KEY).decrypt(token)
    assert "sk-very" not in str(info.value)
    assert token[3:20] not in str(info.value)


def test_associated_data_binds_the_token() -> None:
    box = SecretBox(KEY)
    token = box.encrypt("sk-x", associated_data=PROVIDER_KEY_AAD)
    with pytest.raises(ConfigError):
        box.decrypt(token)
    with pytest.raises(ConfigError):
        box.decrypt(token, associated_data=b"another column")


@given(st.data())
def test_any_tampering_is_detected(data: st.DataObject) -> None:
    box = SecretBox(KEY)
    token = box.encrypt("sk-tamper-me")
    blob = bytearray(base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4)))
    index = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    blob[index] ^= 1 << bit
    forged = "v1:" + base64.urlsafe_b64encode(bytes(blob)).decode().rstrip("=")
    with pytest.raises(ConfigError):
        box.decrypt(forged)


@pytest.mark.parametrize("token", ["", "v2:abcd", "v1:", "v1:!!!!", "v1:AAAA", "plain-secret"])
def test_malformed_tokens_are_config_errors(token: str) -> None:
    with pytest.raises(ConfigError):
        SecretBox(KEY).decrypt(token)


def test_key_length_is_enforced_and_repr_is_safe() -> None:
    with pytest.raises(ConfigError):
        SecretBox(b"short")
    box = SecretBox(KEY)
    assert KEY.hex() not in repr(box)
    assert "SecretBox" in repr(box)


def test_derive_key_uses_base64url_32_bytes_as_is() -> None:
    encoded = base64.urlsafe_b64encode(KEY).decode()
    assert derive_key(encoded) == KEY
    assert derive_key(encoded.rstrip("=")) == KEY


def test_derive_key_hkdf_for_other_strings() -> None:
    first = derive_key("correct horse battery staple")
    assert len(first) == KEY_BYTES
    assert first == derive_key("correct horse battery staple")
    assert first != derive_key("correct horse battery stapler")


def test_master_key_from_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, secret_key=base64.urlsafe_b64encode(KEY).decode())
    assert load_or_create_master_key(settings) == KEY
    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_master_key_file_created_private_and_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh")
    key = load_or_create_master_key(settings)
    path = tmp_path / "fresh" / KEY_FILE_NAME
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_master_key(settings) == key
    assert sorted(p.name for p in path.parent.iterdir()) == [KEY_FILE_NAME]  # no temporary file left


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    results: list[bytes] = []
    lock = threading.Lock()

    def start() -> None:
        key = load_or_create_master_key(settings)
        with lock:
            results.append(key)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(results) == 8
    assert len(set(results)) == 1


def test_readable_key_file_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    load_or_create_master_key(settings)
    os.chmod(tmp_path / KEY_FILE_NAME, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_master_key(settings)


def test_corrupt_key_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_text("not-a-key-at-all\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        load_or_create_master_key(Settings(data_dir=tmp_path))
    assert "not-a-key" not in str(info.value)


def test_mask_secret_examples() -> None:
    assert mask_secret("sk-proj-abcdefghijklmnopa1b2") == "sk-…a1b2"
    assert mask_secret("abcdefghijkl") == "…kl"
    assert mask_secret("short") == "…"


@given(st.text(max_size=200))
def test_mask_reveals_at_most_a_third(secret: str) -> None:
    masked = mask_secret(secret)
    revealed = len(masked) - 1  # minus the ellipsis
    assert revealed <= len(secret) // 3 + 1
    assert masked != secret or secret == "…"
