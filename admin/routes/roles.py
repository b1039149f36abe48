"""``/api/roles``: the built-in roles and the permissions each grants."""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import tag, validate_response

from admin.rbac import Access, requires
from admin.schemas import RolesOut
from trioproxy.roles import PERMISSION_DESCRIPTIONS, ROLE_DESCRIPTIONS, ROLES, Permission

bp = Blueprint("roles", __name__, url_prefix="/api/roles")


@bp.get("")
@requires(Access.AUTHENTICATED)
@tag(["auth"])
@validate_response(RolesOut)
async def list_roles() -> dict[str, Any]:
    """Every built-in role with its permissions, and every permission with what it allows."""
    return {
        "roles": [
            {
                "name": name,
                "description": ROLE_DESCRIPTIONS[name],
                "permissions": sorted(p.value for p in permissions),
            }
            for name, permissions in ROLES.items()
        ],
        "permissions": [
            {"name": permission.value, "description": PERMISSION_DESCRIPTIONS[permission]}
            for permission in Permission
        ],
    }
