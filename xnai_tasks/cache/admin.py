"""What ``xnai cache`` does: match a request without running it, stats, clear and forget.

``match`` and ``stats`` read as the copilot (the client's Redis user, read-only on the roles' caches);
``clear`` and ``forget`` write as the admin user, the embedded Redis' owner (a role's user writes only
its own cache, and the CLI is no role).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis

from xnai_tasks.cache import store
from xnai_tasks.cache.client_side import ClientCache
from xnai_tasks.cache.entry import model_ids
from xnai_tasks.cache.request import PROMPT_KWARGS, request_text
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import UnknownRoleError
from xnai_tasks.security.acl import ADMIN, DEFAULT_USER
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.redis_urls import connection_url
from xnai_tasks.settings import Settings


@contextmanager
def _connected(settings: Settings, user: str) -> Iterator[redis.Redis]:
    conn = broker.connect(connection_url(settings, user))
    try:
        yield conn
    finally:
        conn.close()


def match(settings: Settings, role: str, task: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Would the cache answer ``role.task(**kwargs)``, and from which task? Nothing runs, nothing is counted."""
    _check_role(role)
    keyring = Keyring.load(settings.home)
    with _connected(settings, DEFAULT_USER) as conn:
        cache = ClientCache(conn, keyring)
        key = cache.key_for(role, task, kwargs)
        found = cache.lookup(role, task, kwargs, counted=False)
        if found is None and (role, task) in PROMPT_KWARGS:
            found = _semantic(settings, conn, keyring, role, task, kwargs)
    if found is None:
        return {"hit": False, "kind": None, "score": None, "source_task": None, "key": key}
    return {"hit": True, **found["cache"], "key": key}


def _semantic(
    settings: Settings, conn: redis.Redis, keyring: Keyring, role: str, task: str, kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The semantic lookup a worker would make, with the encoder of this process (cache/encoder.py)."""
    from xnai_tasks.cache.encoder import cache_encoder, embed_texts
    from xnai_tasks.cache.guard import Embedded
    from xnai_tasks.cache.worker_side import find_semantic

    models = model_ids(conn.hgetall(c.model_verdicts_key(role)))
    if not any(m.startswith("encoder:") for m in models):
        return None  # a role without an encoder makes no semantic lookup
    request = request_text(role, task, kwargs)
    holder = cache_encoder(settings)
    try:
        vector = embed_texts(holder, [request.text])[0]
    finally:
        holder.unload()
    return find_semantic(conn, keyring, role, Embedded(request=request, vector=vector), models, counts_as=None)


def stats(settings: Settings) -> list[dict[str, Any]]:
    """Every role's cache: entries, bytes, cap and counted outcomes."""
    with _connected(settings, DEFAULT_USER) as conn:
        return [row.to_dict() for row in store.stats(conn, settings.cache_max_mb << 20)]


def clear(settings: Settings, role: str | None) -> int:
    """Drop the cache of ``role`` (every role when None); how many keys were deleted."""
    roles = c.ROLES if role is None else (role,)
    if role is not None:
        _check_role(role)
    with _connected(settings, ADMIN) as conn:
        return sum(store.clear(conn, r) for r in roles)


def forget(settings: Settings, key: str) -> str | None:
    """Drop the entry under ``key`` in whichever role's cache holds it; that role, or None."""
    with _connected(settings, ADMIN) as conn:
        for role in c.ROLES:
            if store.forget(conn, role, key):
                return role
    return None


def format_match(found: Mapping[str, Any]) -> str:
    if not found["hit"]:
        return f"miss (key {found['key']})" if found["key"] else "miss (no worker published checksummed models)"
    return f"hit: {found['kind']}, score {found['score']}, from task {found['source_task']} (key {found['key']})"


def format_stats(rows: list[dict[str, Any]]) -> str:
    head = ("role", "entries", "MiB", "cap MiB", "hit", "miss", "semantic", "refused", "bad", "evicted")
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for row in rows:
        cells = (
            row["role"],
            row["entries"],
            f"{row['bytes'] / (1 << 20):.2f}",
            f"{row['cap_bytes'] / (1 << 20):.0f}",
            row["hit"],
            row["miss"],
            row["semantic_hit"],
            row["refused"],
            row["bad_entry"],
            row["evicted"],
        )
        lines.append("  ".join(f"{cell!s:>9}" for cell in cells))
    return "\n".join(lines)


def _check_role(role: str) -> None:
    if role not in c.ROLES:
        raise UnknownRoleError(f"unknown role {role!r} (roles: {', '.join(c.ROLES)})")
