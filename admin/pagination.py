"""Paginated lists: ``{"items", "total", "page", "page_size"}`` with a capped page size.

A client asking for more than :data:`MAX_PAGE_SIZE` rows gets :data:`MAX_PAGE_SIZE` (and ``page_size`` in the
answer says so) rather than an error: the cap protects the server (OWASP API4), it is not a contract to enforce
on clients. Pages start at 1; a page past the end is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from admin.schemas import PageQuery

MAX_PAGE_SIZE = 100


def bounds(query: PageQuery) -> tuple[int, int]:
    """(page, page_size) of ``query`` with the page size capped."""
    return query.page, min(query.page_size, MAX_PAGE_SIZE)


def page(items: Sequence[Any], total: int, page_number: int, page_size: int) -> dict[str, Any]:
    return {"items": list(items), "total": total, "page": page_number, "page_size": page_size}
