"""The audit log: one append-only row per mutating admin call, written in the caller's transaction.

:func:`record_audit` runs inside the same session (or connection) as the change it describes, so the change and
its row commit or roll back together. The database refuses UPDATE and DELETE on ``audit_log`` (triggers in
migration 0002); this module offers neither.

Before and after images are masked before they are stored: any field whose name looks like a credential
(``secret``, ``password``, ``key``, ``token``, ``authorization``, ``*_key``, ``*_token``, ``*_hash``, ...) keeps
only a hint (:func:`~trioproxy.crypto.mask_secret`; nothing at all for passwords), at any depth. Strings shaped like
a known credential (gateway keys, ``sk-`` keys, Google API keys, bearer values, JWTs) are masked wherever they
appear, whatever the field is called, so a secret pasted into a name or a header still never reaches the table.
Values are normalised to JSON (timestamps ISO-8601, decimals as strings) so the images read back as they were
written on both dialects.

Everything is blocking; async callers use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from trioproxy.crypto import mask_secret
from trioproxy.store.db import read_transaction
from trioproxy.store.models import AuditLog, utcnow
from trioproxy.store.request_query import check_range, page_offset

_AUDIT = cast(sa.Table, AuditLog.__table__)

# Field names (lower case, "-" read as "_") whose values are credentials.
_SECRET_NAMES = frozenset(
    {
        "secret",
        "password",
        "passwd",
        "password_hash",
        "key",
        "key_hash",
        "token",
        "api_key",
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "credentials",
    }
)
_SECRET_SUFFIXES = ("_secret", "_password", "_key", "_token", "_hash", "_ciphertext", "_credentials")
# camelCase spellings, compared with the underscores removed: apiKey, accessToken, clientSecret, ...
_SECRET_COMPACT = frozenset(
    {
        "apikey",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "clientsecret",
        "privatekey",
        "secretkey",
        "passwordhash",
    }
)
# A password hint would give away its last characters; passwords keep no hint at all.
_PASSWORD_NAMES = frozenset({"password", "passwd", "password_hash"})
_NO_HINT = "…"

# Credentials recognisable by their shape alone (the gateway's own keys, OpenAI/Anthropic-style keys,
# Google API keys, HTTP bearer values, JWTs).
_SECRET_VALUE = re.compile(
    r"tpk_[0-9A-Za-z]{20,}"
    r"|sk-[0-9A-Za-z_\-]{16,}"
    r"|AIza[0-9A-Za-z_\-]{30,}"
    r"|(?i:bearer)\s+[^\s\"',;]{8,}"
    r"|eyJ[0-9A-Za-z_\-]{8,}\.[0-9A-Za-z_\-]{8,}\.[0-9A-Za-z_\-]*"
)

# Column widths, checked up front so SQLite (which ignores them) fails like PostgreSQL.
_WIDTHS = {"actor_name": 100, "action": 64, "object_type": 64, "object_id": 128, "ip": 64}


def is_secret_field(name: str) -> bool:
    """Whether a field called ``name`` holds a credential (so only a hint of it may be stored)."""
    n = name.strip().lower().replace("-", "_")
    return n in _SECRET_NAMES or n.endswith(_SECRET_SUFFIXES) or n.replace("_", "") in _SECRET_COMPACT


def _hint(name: str, value: Any) -> Any:
    if value is None:
        return None  # "was unset" is not a secret, and tells an operator something
    normalized = name.strip().lower().replace("-", "_")
    if isinstance(value, str) and not (normalized in _PASSWORD_NAMES or normalized.endswith("_password")):
        return mask_secret(value)
    return _NO_HINT


def _mask_text(text: str) -> str:
    return _SECRET_VALUE.sub(lambda m: mask_secret(m.group(0)), text)


def mask_image(value: Any) -> Any:
    """``value`` as JSON-ready data with every credential masked (see the module doc); raises TypeError for
    values that have no JSON form."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key.value if isinstance(key, enum.Enum) else key)
            out[name] = _hint(name, item) if is_secret_field(name) else mask_image(item)
        return out
    if isinstance(value, list | tuple):
        return [mask_image(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((mask_image(item) for item in value), key=repr)
    if isinstance(value, enum.Enum):
        return mask_image(value.value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, float):
        # JSON has no NaN or infinity (PostgreSQL's json type rejects them).
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"  # raw bytes are never stored: they may be key material
    raise TypeError(f"an audit image cannot hold {type(value).__name__}")


def record_audit(
    session: Session | Connection,
    *,
    actor_id: int | None,
    actor_name: str | None,
    action: str,
    object_type: str,
    object_id: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    ip: str | None,
) -> None:
    """Append one audit row inside the caller's transaction (it commits or rolls back with the change).

    ``action`` is a verb like ``"create"``, ``"update"``, ``"delete"``, ``"login"``; ``object_type`` names the
    resource (``"user"``, ``"provider_key"``, ...). ``before``/``after`` are masked here, so callers may pass
    whole objects. Raises ValueError for an empty action or object type, or a value wider than its column.
    """
    values: dict[str, Any] = {
        "actor_name": actor_name,
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "ip": ip,
    }
    if not action or not object_type:
        raise ValueError("an audit row needs an action and an object type")
    for column, width in _WIDTHS.items():
        text = values[column]
        if text is not None and len(text) > width:
            raise ValueError(f"audit {column} is longer than {width} characters")
    values.update(
        at=utcnow(),
        actor_id=actor_id,
        actor_name=None if actor_name is None else _mask_text(actor_name),
        object_id=None if object_id is None else _mask_text(object_id),
        before=None if before is None else mask_image(before),
        after=None if after is None else mask_image(after),
    )
    session.execute(sa.insert(_AUDIT).values(**values))


def _audit_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    out = dict(row)
    out["at"] = row["at"].isoformat()
    return out


def list_audit(
    engine: Engine,
    *,
    page: int,
    page_size: int,
    actor_id: int | None = None,
    object_type: str | None = None,
    action: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One page of audit rows, newest first, JSON-ready, and the number of rows matching the filters.

    ``since`` is inclusive, ``until`` exclusive. Raises :class:`~trioproxy.errors.ValidationError` for a bad
    page, page size or time range.
    """
    offset = page_offset(page, page_size)
    check_range(since, until)
    c = _AUDIT.c
    conditions: list[sa.ColumnElement[bool]] = []
    if actor_id is not None:
        conditions.append(c.actor_id == actor_id)
    if object_type is not None:
        conditions.append(c.object_type == object_type)
    if action is not None:
        conditions.append(c.action == action)
    if since is not None:
        conditions.append(c.at >= since)
    if until is not None:
        conditions.append(c.at < until)
    rows_stmt = (
        sa.select(_AUDIT)
        .where(*conditions)
        .order_by(c.at.desc(), c.id.desc())
        .limit(page_size)
        .offset(offset)
    )
    count_stmt = sa.select(sa.func.count()).select_from(_AUDIT).where(*conditions)
    with read_transaction(engine) as conn:
        items = [_audit_json(row) for row in conn.execute(rows_stmt).mappings()]
        total = int(conn.execute(count_stmt).scalar_one())
    return items, total
