"""Role names given on the command line."""

from __future__ import annotations

from xnai_tasks.core import constants as c
from xnai_tasks.errors import UsageError


def role_name(name: str) -> str:
    """``name`` if it is a role; else a usage error listing the roles."""
    if name not in c.ROLES:
        raise UsageError(f"unknown role {name!r} (roles: {', '.join(c.ROLES)})")
    return name


def role_names(spec: str) -> tuple[str, ...]:
    """The roles of a comma-separated list, each once, in order."""
    names = tuple(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    if not names:
        raise UsageError("--roles names no role")
    return tuple(role_name(name) for name in names)
