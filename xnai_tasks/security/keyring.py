"""The keyring: every agent's public keys and who may dispatch what, and each agent's current signer.

Loaded from ``XNAI_HOME/keys`` (:mod:`xnai_tasks.security.key_store`), it notices when the file changed,
so a revocation or rotation reaches running workers and producers without a restart. On a host joined to a hub it
also reads the hub's revocation list in Redis (:mod:`xnai_tasks.security.revocation_list`), so a key revoked on the
hub stops verifying here within 5 s too. Changing it is :mod:`xnai_tasks.security.key_admin`'s business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any, Final

from nacl.signing import SigningKey, VerifyKey

from xnai_tasks.core import constants as c
from xnai_tasks.errors import KeyringError
from xnai_tasks.security.key_pair import KeyEntry, KeyStatus, Signer
from xnai_tasks.security.key_store import (
    keyring_path,
    parse_pattern,
    private_key_path,
    read_keyring,
    read_seed,
    stamp,
)
from xnai_tasks.security.revocation_list import RevocationFeed, feed_for

log = logging.getLogger(__name__)

#: How often a loaded :class:`Keyring` looks whether the file changed (revocations, rotations).
REFRESH_S: Final = 5.0
#: On an unknown key id the file is looked at again, at most this often.
MISS_REFRESH_S: Final = 1.0


@dataclass(frozen=True)
class _State:
    by_kid: dict[str, KeyEntry]
    permissions: dict[str, tuple[str, ...]]
    grants: dict[str, frozenset[tuple[str, str]]]


def _build_state(
    entries: Iterable[KeyEntry], permissions: Mapping[str, Sequence[str]], revoked: frozenset[str] = frozenset()
) -> _State:
    by_kid: dict[str, KeyEntry] = {}
    for entry in entries:
        if entry.kid in revoked and not entry.revoked:
            entry = dc_replace(entry, revoked=True)
        if entry.verify_key is None:
            entry = dc_replace(entry, verify_key=VerifyKey(entry.public_key))
        by_kid[entry.kid] = entry
    perms = {agent: tuple(patterns) for agent, patterns in permissions.items()}
    grants = {agent: frozenset(parse_pattern(p) for p in patterns) for agent, patterns in perms.items()}
    return _State(by_kid, perms, grants)


class Keyring:
    """Public keys by id and per-agent permissions; cheap to query per message.

    Loaded with :meth:`load`, it re-reads ``keyring.json`` when the file changed, looking at most every
    :data:`REFRESH_S` seconds (and at most every :data:`MISS_REFRESH_S` on an unknown key id), so a
    revocation or rotation reaches running workers without a restart. With a ``feed`` (a host joined to a hub),
    each of those looks also reads the hub's revocation list, which can only mark keys revoked.
    """

    def __init__(
        self,
        entries: Iterable[KeyEntry],
        permissions: Mapping[str, Sequence[str]],
        *,
        path: Path | None = None,
        feed: RevocationFeed | None = None,
    ) -> None:
        self._entries = tuple(entries)
        self._permissions = {agent: tuple(patterns) for agent, patterns in permissions.items()}
        self._feed = feed
        self._state = _build_state(self._entries, self._permissions, self._revoked())
        self._path = path
        self._stamp = stamp(path) if path is not None else None
        # with a feed, the first look is due at once: a keyring loaded just after a revocation must not miss it
        self._checked = time.monotonic() - (REFRESH_S if feed is not None else 0.0)

    @classmethod
    def load(cls, home: Path) -> Keyring:
        """Read ``<home>/keys/keyring.json``; KeyringError names the file on any problem."""
        path = keyring_path(home)
        seen = stamp(path)
        entries, permissions = read_keyring(path)
        keyring = cls(entries, permissions, path=path, feed=feed_for(home))
        keyring._stamp = seen
        return keyring

    @property
    def path(self) -> Path | None:
        return self._path

    def entries(self) -> tuple[KeyEntry, ...]:
        """Every key, oldest first."""
        return tuple(sorted(self._state.by_kid.values(), key=lambda e: (e.created_at, e.kid)))

    def agents(self) -> tuple[str, ...]:
        """Agents that have a key or permissions, sorted."""
        names = {e.agent for e in self._state.by_kid.values()} | set(self._state.permissions)
        return tuple(sorted(names))

    def entry(self, kid: str) -> KeyEntry | None:
        """The key with this id, or None. May re-read a changed keyring file (rate-limited)."""
        if self._path is not None and time.monotonic() - self._checked >= REFRESH_S:
            self.refresh()
        found = self._state.by_kid.get(kid)
        if found is None and self._path is not None and time.monotonic() - self._checked >= MISS_REFRESH_S:
            self.refresh()
            found = self._state.by_kid.get(kid)
        return found

    def public_key(self, kid: str) -> bytes:
        """Raw 32-byte public key of ``kid``; KeyringError if unknown."""
        return self._known(kid).public_key

    def verify_key(self, kid: str) -> Any:
        """Cached :class:`nacl.signing.VerifyKey` of ``kid``; KeyringError if unknown."""
        return self._known(kid).verify_key

    def status(self, kid: str, now: float | None = None) -> KeyStatus:
        """Life-cycle state of ``kid`` at ``now`` (default: the current time); KeyringError if unknown."""
        return self._known(kid).status(time.time() if now is None else now)

    def active_entry(self, agent: str, now: float | None = None) -> KeyEntry | None:
        """The agent's newest active key, or None."""
        at = time.time() if now is None else now
        active = [e for e in self._state.by_kid.values() if e.agent == agent and e.status(at) is KeyStatus.ACTIVE]
        return max(active, key=lambda e: (e.created_at, e.kid), default=None)

    def permissions(self, agent: str) -> tuple[str, ...]:
        """The agent's permission patterns, as written."""
        return self._state.permissions.get(agent, ())

    def is_authorized(self, agent: str, task_name: str, role: str) -> bool:
        """May ``agent`` dispatch ``task_name`` (``ROLE.TASK``) to ``role``? The prefix must be ``role``."""
        task = c.split_task_name(task_name)[1]
        if not task or c.role_of_task(task_name) != role:
            return False
        grants = self._state.grants.get(agent)
        if not grants:
            return False
        return (role, task) in grants or (role, "*") in grants or ("*", task) in grants or ("*", "*") in grants

    def refresh(self) -> bool:
        """Re-read the file if it changed since loaded, and the hub's revocation list if this host joined one;
        True when either changed something. Keeps the old state on error."""
        self._checked = time.monotonic()
        if self._path is None:
            return False
        learned = self._feed is not None and self._feed.poll()
        seen = stamp(self._path)
        if seen != self._stamp:
            self._stamp = seen
            try:
                entries, permissions = read_keyring(self._path)
                self._entries = tuple(entries)
                self._permissions = {agent: tuple(patterns) for agent, patterns in permissions.items()}
            except KeyringError as exc:
                log.warning("keyring not reloaded, keeping the previous one: %s", exc)
                if not learned:
                    return False
        elif not learned:
            return False
        self._state = _build_state(self._entries, self._permissions, self._revoked())
        return True

    def _revoked(self) -> frozenset[str]:
        """Keys revoked beyond what the file says: the hub's list, on a joined host."""
        return frozenset() if self._feed is None else self._feed.known()

    def _known(self, kid: str) -> KeyEntry:
        found = self._state.by_kid.get(kid)
        if found is None:
            raise KeyringError(f"unknown key id {kid!r}")
        return found


_SHARED_KEYRINGS: dict[Path, Keyring] = {}


def shared_keyring(home: Path) -> Keyring:
    """One keyring per XNAI_HOME for this process (it re-reads its file when the file changes)."""
    found = _SHARED_KEYRINGS.get(home)
    if found is None:
        found = _SHARED_KEYRINGS[home] = Keyring.load(home)
    return found


def load_signer(home: Path, agent: str, *, keyring: Keyring | None = None, now: float | None = None) -> Signer:
    """The agent's active private key. KeyringError (naming the file) if missing, loose mode or mismatched."""
    ring = Keyring.load(home) if keyring is None else keyring
    entry = ring.active_entry(agent, now)
    if entry is None:
        raise KeyringError(
            f"agent {agent!r} has no active key in {keyring_path(home)}; "
            f"run `xnai keys init` or `xnai keys rotate {agent}`"
        )
    path = private_key_path(home, agent, entry.kid)
    signing_key = SigningKey(read_seed(path))
    if bytes(signing_key.verify_key) != entry.public_key:
        raise KeyringError(f"private key {path} does not match its public key in {keyring_path(home)}")
    return Signer(agent=agent, kid=entry.kid, signing_key=signing_key)


class SignerSource:
    """The current :class:`Signer` of one agent for a long-running producer.

    Looks at most every ``refresh_s`` seconds whether ``keyring.json`` changed and then reloads, so a
    rotation is picked up without a restart. Raises KeyringError when the agent has no usable key.
    """

    def __init__(self, home: Path, agent: str, *, refresh_s: float = REFRESH_S) -> None:
        self._home = home
        self._agent = agent
        self._refresh_s = refresh_s
        self._stamp = stamp(keyring_path(home))
        self._signer = load_signer(home, agent)
        self._checked = time.monotonic()

    def get(self) -> Signer:
        now = time.monotonic()
        if now - self._checked >= self._refresh_s:
            self._checked = now
            seen = stamp(keyring_path(self._home))
            if seen != self._stamp:
                self._signer = load_signer(self._home, self._agent)
                self._stamp = seen
        return self._signer
