"""Provider secrets at rest: AES-256-GCM under one master key.

A stored secret is the token ``v1:<base64url(nonce || ciphertext+tag)>`` with a random 96-bit nonce per
encryption (NIST SP 800-38D allows 2^32 random-nonce encryptions per key; a gateway stores thousands). The
version prefix lets a later format (a key id for rotation, say) live beside old rows. Associated data binds a
ciphertext to its purpose, so a token copied into another column does not decrypt there.

The master key comes from ``settings.secret_key`` or from ``data_dir/secret.key``, created on first start with
mode 0600 (created with O_EXCL, so two processes starting together cannot both write one).

Error handling: a token that does not decrypt raises :class:`~trioproxy.errors.ConfigError` without any part
of the token or the key in the message. Nothing here logs.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trioproxy.errors import ConfigError
from trioproxy.settings import Settings

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the 96-bit nonce GCM is designed for
TOKEN_PREFIX = "v1:"
KEY_FILE_NAME = "secret.key"
# Associated data of provider key secrets (column provider_keys.secret_ciphertext).
PROVIDER_KEY_AAD = b"trioproxy/provider_keys.secret/v1"
_HKDF_SALT = b"trioproxy master key"
_HKDF_INFO = b"trioproxy/aes-256-gcm/v1"


def _b64decode(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SecretBox:
    """Encrypts and decrypts short secrets (provider API keys) with AES-256-GCM."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"the master key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(aes-256-gcm, v1)"

    def encrypt(self, plain: str, *, associated_data: bytes | None = None) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain.encode("utf-8"), associated_data)
        return TOKEN_PREFIX + _b64encode(nonce + sealed)

    def decrypt(self, token: str, *, associated_data: bytes | None = None) -> str:
        if not token.startswith(TOKEN_PREFIX):
            raise ConfigError("stored secret has an unknown format")
        try:
            blob = _b64decode(token[len(TOKEN_PREFIX) :])
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("stored secret is not valid base64url") from exc
        if len(blob) < NONCE_BYTES + 16:
            raise ConfigError("stored secret is truncated")
        try:
            plain = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
        except InvalidTag:
            raise ConfigError("stored secret does not decrypt: wrong master key or tampered data") from None
        return plain.decode("utf-8")


def derive_key(secret: str) -> bytes:
    """A 32-byte key from ``secret``: base64url of exactly 32 bytes is used as is, anything else goes through
    HKDF.

    HKDF is no password hash: an operator-chosen string must already be long and random.
    """
    try:
        raw = _b64decode(secret)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == KEY_BYTES:
        return raw
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_HKDF_SALT, info=_HKDF_INFO)
    return hkdf.derive(secret.encode("utf-8"))


def load_or_create_master_key(settings: Settings) -> bytes:
    """The master key: from ``settings.secret_key`` if set, else ``data_dir/secret.key`` (created on first
    use).

    Refuses a key file that group or others may read, as OpenSSH does for private keys.
    """
    if settings.secret_key:
        return derive_key(settings.secret_key)
    path = settings.data_dir / KEY_FILE_NAME
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        return _read_key_file(path)
    # Written in full to a private temporary file, then linked into place: link() fails if the name exists, so
    # of two processes starting together exactly one key wins and nobody ever reads a half-written file.
    key = secrets.token_bytes(KEY_BYTES)
    tmp = settings.data_dir / f".{KEY_FILE_NAME}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(_b64encode(key) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key_file(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the master key file {path}") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"the master key file {path} is readable by others; run chmod 600 on it")
    try:
        key = _b64decode(text)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"the master key file {path} does not hold a base64url {KEY_BYTES}-byte key")
    return key


def mask_secret(secret: str) -> str:
    """A display form that identifies a secret without revealing it: ``sk-…a1b2``.

    Short secrets show less: revealing 7 characters of a 12-character secret would give most of it away.
    """
    if len(secret) >= 20:
        return f"{secret[:3]}…{secret[-4:]}"
    if len(secret) >= 10:
        return f"…{secret[-2:]}"
    return "…"
