"""Changing the keyring (``xnai keys ...``): create keys, rotate, revoke, authorize, list.

Every change is made under the keyring's lock and written atomically (:mod:`xnai_tasks.security.key_store`);
running workers and producers pick it up by themselves (:class:`xnai_tasks.security.keyring.Keyring`). A revocation
is also published to Redis (:mod:`xnai_tasks.security.revocation_list`), where hosts joined to this hub read it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any, Final

from xnai_tasks.core import constants as c
from xnai_tasks.errors import KeyringError
from xnai_tasks.security.key_pair import KeyEntry, KeyStatus
from xnai_tasks.security.key_store import (
    Permissions,
    check_agent,
    keyring_path,
    locked,
    new_key,
    parse_pattern,
    private_key_path,
    read_keyring,
    read_or_empty,
    unlink_quiet,
    write_keyring,
)
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.revocation_list import publish_from_home

log = logging.getLogger(__name__)

#: Default grace period of a rotated-out key, seconds.
DEFAULT_GRACE_S: Final = 86400.0


def default_permissions(agent: str) -> list[str]:
    """Copilot may dispatch every task of every role; a role agent its own role's tasks; others nothing."""
    if agent == "copilot":
        return ["*.*"]
    if agent in c.ROLES:
        return [f"{agent}.*"]
    return []


def init_keys(home: Path, *, agents: Sequence[str] = c.AGENTS, now: float | None = None) -> Keyring:
    """Give every agent without an active key a new key pair and default permissions. Idempotent."""
    at = time.time() if now is None else now
    for agent in agents:
        check_agent(agent)
    with locked(home) as directory:
        entries, permissions = read_or_empty(keyring_path(home))
        changed = not keyring_path(home).exists()
        for agent in agents:
            if not any(e.agent == agent and e.status(at) is KeyStatus.ACTIVE for e in entries):
                entries.append(new_key(directory, agent, at))
                changed = True
            if agent not in permissions:
                permissions[agent] = default_permissions(agent)
                changed = True
        if changed:
            write_keyring(keyring_path(home), entries, permissions)
    return Keyring.load(home)


def rotate(home: Path, agent: str, grace_s: float = DEFAULT_GRACE_S, *, now: float | None = None) -> KeyEntry:
    """Make a new active key for ``agent``; its old active keys verify until ``now + grace_s``, then expire.

    The old private key files are deleted: only the new key signs from now on.
    """
    check_agent(agent)
    if not isinstance(grace_s, int | float) or not math.isfinite(grace_s) or grace_s < 0:
        raise KeyringError(f"grace period must be a number of seconds >= 0, not {grace_s!r}")
    at = time.time() if now is None else now
    with locked(home) as directory:
        entries, permissions = read_keyring(keyring_path(home))
        _check_known(home, agent, entries, permissions)
        new = new_key(directory, agent, at)
        retired = [e for e in entries if e.agent == agent and e.status(at) is KeyStatus.ACTIVE]
        retired_kids = {e.kid for e in retired}
        entries = [dc_replace(e, expires_at=at + grace_s) if e.kid in retired_kids else e for e in entries]
        entries.append(new)
        permissions.setdefault(agent, default_permissions(agent))
        write_keyring(keyring_path(home), entries, permissions)
        for old in retired:
            unlink_quiet(private_key_path(home, old.agent, old.kid))
    return new


def revoke(home: Path, kid: str, *, admin_url: str | None = None) -> KeyEntry:
    """Mark ``kid`` revoked (it never verifies again) and delete its private key file; then publish the revoked
    keys to Redis as admin (``admin_url``, default: this home's embedded Redis), for the hosts joined to it."""
    with locked(home):
        entries, permissions = read_keyring(keyring_path(home))
        target = next((e for e in entries if e.kid == kid), None)
        if target is None:
            raise KeyringError(f"no key {kid!r} in {keyring_path(home)}")
        target = dc_replace(target, revoked=True)
        entries = [target if e.kid == kid else e for e in entries]
        write_keyring(keyring_path(home), entries, permissions)
        unlink_quiet(private_key_path(home, target.agent, kid))
    problem = publish_from_home(home, admin_url)
    if problem is not None:
        # the file is what this host trusts; joined hosts learn it once `xnai host publish` reaches Redis
        log.warning("revoked %s here; not sent to joined hosts: %s", kid, problem)
    return target


def authorize(home: Path, agent: str, patterns: Sequence[str], replace: bool = False) -> tuple[str, ...]:
    """Add ``patterns`` (``ROLE.TASK``, ``*`` allowed) to the agent's permissions, or set exactly them."""
    check_agent(agent)
    if isinstance(patterns, str):
        raise KeyringError("patterns must be a list of ROLE.TASK strings, not one string")
    for pattern in patterns:
        parse_pattern(pattern)
    with locked(home):
        entries, permissions = read_keyring(keyring_path(home))
        _check_known(home, agent, entries, permissions)
        current = [] if replace else list(permissions.get(agent, ()))
        for pattern in patterns:
            if pattern not in current:
                current.append(pattern)
        permissions[agent] = current
        write_keyring(keyring_path(home), entries, permissions)
    return tuple(current)


def list_keys(home: Path, *, now: float | None = None) -> list[dict[str, Any]]:
    """One row per key, by agent then age: agent, kid, age_s, status, expires_at, permissions."""
    at = time.time() if now is None else now
    entries, permissions = read_keyring(keyring_path(home))
    return [
        {
            "agent": e.agent,
            "kid": e.kid,
            "age_s": round(at - e.created_at, 3),
            "status": str(e.status(at)),
            "expires_at": e.expires_at,
            "permissions": list(permissions.get(e.agent, ())),
        }
        for e in sorted(entries, key=lambda e: (e.agent, e.created_at, e.kid))
    ]


def _check_known(home: Path, agent: str, entries: Sequence[KeyEntry], permissions: Permissions) -> None:
    if not any(e.agent == agent for e in entries) and agent not in permissions:
        raise KeyringError(f"agent {agent!r} has no keys in {keyring_path(home)}; run `xnai keys init`")
