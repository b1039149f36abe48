"""``/api/audit``: the append-only audit log, read-only (there is no route that writes, changes or deletes it).

Every mutating admin call left exactly one row (actor, action, object, masked before/after images, client
address, time). A caller that does not see every tenant sees only the rows of its own actions.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import Field
from quart import Blueprint
from quart_schema import tag, validate_querystring, validate_response

from admin import pagination
from admin.rbac import current_actor, requires
from admin.routes.requests import instant
from admin.schemas import Output, Page, PageQuery, QueryId
from admin.state import get_state
from trioproxy.roles import Permission
from trioproxy.store import audit

bp = Blueprint("audit", __name__, url_prefix="/api/audit")

Word = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_.-]+$")]


class AuditQuery(PageQuery):
    actor_id: QueryId | None = None
    object_type: Word | None = Field(default=None, description="e.g. user, provider_key, gateway_key")
    action: Word | None = Field(default=None, description="e.g. create, update, delete, login")
    since: dt.datetime | None = Field(default=None, description="inclusive, ISO-8601 with an offset")
    until: dt.datetime | None = Field(default=None, description="exclusive, ISO-8601 with an offset")


class AuditOut(Output):
    id: int
    at: dt.datetime
    actor_id: int | None = Field(description="null: the system (CLI, bootstrap)")
    actor_name: str | None
    action: str
    object_type: str
    object_id: str | None
    before: dict[str, Any] | None = Field(description="the object before the change, credentials masked")
    after: dict[str, Any] | None = Field(description="the object after the change, credentials masked")
    ip: str | None


@bp.get("")
@requires(Permission.VIEW_AUDIT)
@tag(["audit"])
@validate_querystring(AuditQuery)
@validate_response(Page[AuditOut])
async def list_audit(query_args: AuditQuery) -> dict[str, Any]:
    """Audit rows, newest first, with filters (``since`` inclusive, ``until`` exclusive)."""
    state = get_state()
    actor = current_actor()
    page, size = pagination.bounds(query_args)
    actor_id = query_args.actor_id
    own = actor.owner_filter()
    if own is not None:
        if actor_id is not None and actor_id != own:
            return pagination.page([], 0, page, size)
        actor_id = own
    items, total = await state.db(
        audit.list_audit,
        state.engine,
        page=page,
        page_size=size,
        actor_id=actor_id,
        object_type=query_args.object_type,
        action=query_args.action,
        since=instant("since", query_args.since),
        until=instant("until", query_args.until),
    )
    return pagination.page(items, total, page, size)
