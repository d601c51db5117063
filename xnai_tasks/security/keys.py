"""The keyring under ``XNAI_HOME/keys``: one Ed25519 key pair per agent, and who may dispatch what.

Layout: ``keyring.json`` holds the public keys, their life cycle (created, expires, revoked) and each
agent's permissions; each private key is its own ``AGENT.KID.key`` file (hex seed, mode 0600). The
keyring file is replaced atomically and changed under a lock. Private keys are never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from nacl.signing import SigningKey, VerifyKey

from xnai_tasks.core import constants as c
from xnai_tasks.errors import KeyringError

log = logging.getLogger(__name__)

KEYS_DIR: Final = "keys"
KEYRING_FILE: Final = "keyring.json"
LOCK_FILE: Final = ".lock"
KEYRING_VERSION: Final = 1
#: Default grace period of a rotated-out key, seconds.
DEFAULT_GRACE_S: Final = 86400.0
#: How often a loaded :class:`Keyring` looks whether the file changed (revocations, rotations).
REFRESH_S: Final = 5.0
#: On an unknown key id the file is looked at again, at most this often.
MISS_REFRESH_S: Final = 1.0

_AGENT_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_KID_RE: Final = re.compile(r"[0-9a-f]{16}")
_TASK_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MAX_KEY_FILE: Final = 4096
_MAX_KEYRING_FILE: Final = 16 * 1024 * 1024


class KeyStatus(StrEnum):
    """Life-cycle state of a key at a given time."""

    ACTIVE = "active"
    GRACE = "grace"
    EXPIRED = "expired"
    REVOKED = "revoked"


def key_id(public_key: bytes) -> str:
    """The key id: the first 16 hex characters of the SHA-256 of the raw public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def keys_dir(home: Path) -> Path:
    """Directory holding the keyring and the private keys."""
    return home / KEYS_DIR


def keyring_path(home: Path) -> Path:
    """Path of ``keyring.json``."""
    return home / KEYS_DIR / KEYRING_FILE


def private_key_path(home: Path, agent: str, kid: str) -> Path:
    """Path of one private key file."""
    return home / KEYS_DIR / f"{agent}.{kid}.key"


def default_permissions(agent: str) -> list[str]:
    """Copilot may dispatch every task of every role; a role agent its own role's tasks; others nothing."""
    if agent == "copilot":
        return ["*.*"]
    if agent in c.ROLES:
        return [f"{agent}.*"]
    return []


def parse_pattern(pattern: str) -> tuple[str, str]:
    """Split a permission pattern ``ROLE.TASK`` (either part may be ``*``); raise KeyringError if bad."""
    role, dot, task = pattern.partition(".") if isinstance(pattern, str) else ("", "", "")
    if not dot or not (role == "*" or role in c.ROLES) or not (task == "*" or _TASK_RE.fullmatch(task)):
        raise KeyringError(
            f"bad permission pattern {pattern!r}: expected ROLE.TASK with ROLE one of "
            f"{', '.join(c.ROLES)} or '*', and TASK a task name or '*'"
        )
    return role, task


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One public key of the keyring, with its cached :class:`nacl.signing.VerifyKey`."""

    kid: str
    agent: str
    public_key: bytes
    created_at: float
    expires_at: float | None = None
    revoked: bool = False
    verify_key: Any = field(default=None, repr=False, compare=False)

    def status(self, now: float) -> KeyStatus:
        """Active (signs and verifies), grace (verifies only), expired or revoked (neither)."""
        if self.revoked:
            return KeyStatus.REVOKED
        if self.expires_at is None:
            return KeyStatus.ACTIVE
        return KeyStatus.GRACE if now < self.expires_at else KeyStatus.EXPIRED

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "agent": self.agent,
            "public_key": self.public_key.hex(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked": self.revoked,
        }


@dataclass(frozen=True)
class Signer:
    """An agent's active private key. ``repr`` never shows the key."""

    agent: str
    kid: str
    signing_key: Any = field(repr=False, compare=False)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        signature: bytes = self.signing_key.sign(data).signature
        return signature


@dataclass(frozen=True)
class _State:
    by_kid: dict[str, KeyEntry]
    permissions: dict[str, tuple[str, ...]]
    grants: dict[str, frozenset[tuple[str, str]]]


def _build_state(entries: Iterable[KeyEntry], permissions: Mapping[str, Sequence[str]]) -> _State:
    by_kid: dict[str, KeyEntry] = {}
    for entry in entries:
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
    revocation or rotation reaches running workers without a restart.
    """

    def __init__(
        self,
        entries: Iterable[KeyEntry],
        permissions: Mapping[str, Sequence[str]],
        *,
        path: Path | None = None,
    ) -> None:
        self._state = _build_state(entries, permissions)
        self._path = path
        self._stamp = _stamp(path) if path is not None else None
        self._checked = time.monotonic()

    @classmethod
    def load(cls, home: Path) -> Keyring:
        """Read ``<home>/keys/keyring.json``; KeyringError names the file on any problem."""
        path = keyring_path(home)
        stamp = _stamp(path)
        entries, permissions = _read_keyring(path)
        keyring = cls(entries, permissions, path=path)
        keyring._stamp = stamp
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
        task = task_name.partition(".")[2]
        if not task or c.role_of_task(task_name) != role:
            return False
        grants = self._state.grants.get(agent)
        if not grants:
            return False
        return (role, task) in grants or (role, "*") in grants or ("*", task) in grants or ("*", "*") in grants

    def refresh(self) -> bool:
        """Re-read the file if it changed since loaded; True when it did. Keeps the old state on error."""
        self._checked = time.monotonic()
        if self._path is None:
            return False
        stamp = _stamp(self._path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            entries, permissions = _read_keyring(self._path)
            self._state = _build_state(entries, permissions)
        except KeyringError as exc:
            log.warning("keyring not reloaded, keeping the previous one: %s", exc)
            return False
        return True

    def _known(self, kid: str) -> KeyEntry:
        found = self._state.by_kid.get(kid)
        if found is None:
            raise KeyringError(f"unknown key id {kid!r}")
        return found


class SignerSource:
    """The current :class:`Signer` of one agent for a long-running producer.

    Looks at most every ``refresh_s`` seconds whether ``keyring.json`` changed and then reloads, so a
    rotation is picked up without a restart. Raises KeyringError when the agent has no usable key.
    """

    def __init__(self, home: Path, agent: str, *, refresh_s: float = REFRESH_S) -> None:
        self._home = home
        self._agent = agent
        self._refresh_s = refresh_s
        self._stamp = _stamp(keyring_path(home))
        self._signer = load_signer(home, agent)
        self._checked = time.monotonic()

    def get(self) -> Signer:
        now = time.monotonic()
        if now - self._checked >= self._refresh_s:
            self._checked = now
            stamp = _stamp(keyring_path(self._home))
            if stamp != self._stamp:
                self._signer = load_signer(self._home, self._agent)
                self._stamp = stamp
        return self._signer


# ---- operations on the files ----


_SHARED_KEYRINGS: dict[Path, Keyring] = {}


def shared_keyring(home: Path) -> Keyring:
    """One keyring per XNAI_HOME for this process (it re-reads its file when the file changes)."""
    found = _SHARED_KEYRINGS.get(home)
    if found is None:
        found = _SHARED_KEYRINGS[home] = Keyring.load(home)
    return found


def init_keys(home: Path, *, agents: Sequence[str] = c.AGENTS, now: float | None = None) -> Keyring:
    """Give every agent without an active key a new key pair and default permissions. Idempotent."""
    at = time.time() if now is None else now
    for agent in agents:
        _check_agent(agent)
    with _locked(home) as directory:
        entries, permissions = _read_or_empty(keyring_path(home))
        changed = not keyring_path(home).exists()
        for agent in agents:
            if not any(e.agent == agent and e.status(at) is KeyStatus.ACTIVE for e in entries):
                entries.append(_new_key(directory, agent, at))
                changed = True
            if agent not in permissions:
                permissions[agent] = default_permissions(agent)
                changed = True
        if changed:
            _write_keyring(keyring_path(home), entries, permissions)
    return Keyring.load(home)


def rotate(home: Path, agent: str, grace_s: float = DEFAULT_GRACE_S, *, now: float | None = None) -> KeyEntry:
    """Make a new active key for ``agent``; its old active keys verify until ``now + grace_s``, then expire.

    The old private key files are deleted: only the new key signs from now on.
    """
    _check_agent(agent)
    if not isinstance(grace_s, int | float) or not math.isfinite(grace_s) or grace_s < 0:
        raise KeyringError(f"grace period must be a number of seconds >= 0, not {grace_s!r}")
    at = time.time() if now is None else now
    with _locked(home) as directory:
        entries, permissions = _read_keyring(keyring_path(home))
        if not any(e.agent == agent for e in entries) and agent not in permissions:
            raise KeyringError(f"agent {agent!r} has no keys in {keyring_path(home)}; run `xnai keys init`")
        new = _new_key(directory, agent, at)
        retired = [e for e in entries if e.agent == agent and e.status(at) is KeyStatus.ACTIVE]
        retired_kids = {e.kid for e in retired}
        entries = [dc_replace(e, expires_at=at + grace_s) if e.kid in retired_kids else e for e in entries]
        entries.append(new)
        permissions.setdefault(agent, default_permissions(agent))
        _write_keyring(keyring_path(home), entries, permissions)
        for old in retired:
            _unlink_quiet(private_key_path(home, old.agent, old.kid))
    return new


def revoke(home: Path, kid: str) -> KeyEntry:
    """Mark ``kid`` revoked (it never verifies again) and delete its private key file."""
    with _locked(home):
        entries, permissions = _read_keyring(keyring_path(home))
        target = next((e for e in entries if e.kid == kid), None)
        if target is None:
            raise KeyringError(f"no key {kid!r} in {keyring_path(home)}")
        target = dc_replace(target, revoked=True)
        entries = [target if e.kid == kid else e for e in entries]
        _write_keyring(keyring_path(home), entries, permissions)
        _unlink_quiet(private_key_path(home, target.agent, kid))
    return target


def authorize(home: Path, agent: str, patterns: Sequence[str], replace: bool = False) -> tuple[str, ...]:
    """Add ``patterns`` (``ROLE.TASK``, ``*`` allowed) to the agent's permissions, or set exactly them."""
    _check_agent(agent)
    if isinstance(patterns, str):
        raise KeyringError("patterns must be a list of ROLE.TASK strings, not one string")
    for pattern in patterns:
        parse_pattern(pattern)
    with _locked(home):
        entries, permissions = _read_keyring(keyring_path(home))
        if not any(e.agent == agent for e in entries) and agent not in permissions:
            raise KeyringError(f"agent {agent!r} has no keys in {keyring_path(home)}; run `xnai keys init`")
        current = [] if replace else list(permissions.get(agent, ()))
        for pattern in patterns:
            if pattern not in current:
                current.append(pattern)
        permissions[agent] = current
        _write_keyring(keyring_path(home), entries, permissions)
    return tuple(current)


def list_keys(home: Path, *, now: float | None = None) -> list[dict[str, Any]]:
    """One row per key, by agent then age: agent, kid, age_s, status, expires_at, permissions."""
    at = time.time() if now is None else now
    entries, permissions = _read_keyring(keyring_path(home))
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
    raw = _read_private(path)
    try:
        seed = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        seed = b""
    if len(seed) != 32:
        raise KeyringError(f"private key {path} is malformed (expected 64 hex characters)")
    signing_key = SigningKey(seed)
    if bytes(signing_key.verify_key) != entry.public_key:
        raise KeyringError(f"private key {path} does not match its public key in {keyring_path(home)}")
    return Signer(agent=agent, kid=entry.kid, signing_key=signing_key)


# ---- helpers ----


def _check_agent(agent: str) -> None:
    if not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent):
        raise KeyringError(f"bad agent name {agent!r}: lower-case letters, digits, '_' or '-', at most 32")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _ensure_dir(home: Path) -> Path:
    directory = keys_dir(home)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyringError(f"key directory {directory} cannot be created: {exc.strerror}") from None
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise KeyringError(f"key directory {directory} is not a directory")
    _check_dir(directory)
    return directory


def _check_dir(directory: Path) -> None:
    """Refuse a key directory others may write to: they could swap the keyring or a key file."""
    try:
        mode = os.stat(directory).st_mode
    except OSError as exc:
        raise KeyringError(f"key directory {directory} cannot be read: {exc.strerror}") from None
    if mode & 0o022:
        raise KeyringError(
            f"key directory {directory} is writable by group or others (mode {mode & 0o777:04o}); "
            f"run: chmod 700 {directory}"
        )


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[Path]:
    directory = _ensure_dir(home)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory
    finally:
        os.close(fd)


def _open_checked(path: Path, what: str, forbidden: int, fix: str) -> int:
    if path.parent.exists():
        _check_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyringError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise KeyringError(f"{what} {path} cannot be opened: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if mode & forbidden:
        os.close(fd)
        raise KeyringError(f"{what} {path} has mode {mode & 0o777:04o}, which is too open; run: {fix} {path}")
    return fd


def _read_fd(fd: int, limit: int) -> bytes:
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit + 1)


def _read_private(path: Path) -> bytes:
    fd = _open_checked(path, "private key", 0o077, "chmod 600")
    raw = _read_fd(fd, _MAX_KEY_FILE)
    if len(raw) > _MAX_KEY_FILE:
        raise KeyringError(f"private key {path} is malformed (too large)")
    return raw


def _read_or_empty(path: Path) -> tuple[list[KeyEntry], dict[str, list[str]]]:
    if not path.exists():
        return [], {}
    return _read_keyring(path)


def _read_keyring(path: Path) -> tuple[list[KeyEntry], dict[str, list[str]]]:
    if not path.exists():
        raise KeyringError(f"no keyring at {path}; run `xnai keys init`")
    fd = _open_checked(path, "keyring", 0o022, "chmod 644")
    raw = _read_fd(fd, _MAX_KEYRING_FILE)
    try:
        doc = json.loads(raw)
        return _parse_keyring(doc)
    except (ValueError, TypeError, KeyError, AttributeError, KeyringError) as exc:
        raise KeyringError(f"keyring {path} is malformed: {exc}") from None


def _parse_keyring(doc: Any) -> tuple[list[KeyEntry], dict[str, list[str]]]:
    if not isinstance(doc, dict) or doc.get("version") != KEYRING_VERSION:
        raise ValueError(f"expected an object with version {KEYRING_VERSION}")
    entries = [_parse_entry(item) for item in doc["keys"]]
    if len({e.kid for e in entries}) != len(entries):
        raise ValueError("duplicate key id")
    permissions: dict[str, list[str]] = {}
    if not isinstance(doc["permissions"], dict):
        raise ValueError("permissions is not an object")
    for agent, patterns in doc["permissions"].items():
        _check_agent(agent)
        if not isinstance(patterns, list):
            raise ValueError(f"permissions of {agent!r} are not a list")
        for pattern in patterns:
            parse_pattern(pattern)
        permissions[agent] = list(patterns)
    return entries, permissions


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} is not a number")
    return float(value)


def _parse_entry(item: Any) -> KeyEntry:
    kid, agent, public_hex = item["kid"], item["agent"], item["public_key"]
    _check_agent(agent)
    if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
        raise ValueError(f"bad key id {kid!r}")
    public_key = bytes.fromhex(public_hex)
    if len(public_key) != 32 or key_id(public_key) != kid:
        raise ValueError(f"public key of {kid} does not match its id")
    expires = item.get("expires_at")
    revoked = item.get("revoked", False)
    if not isinstance(revoked, bool):
        raise ValueError(f"revoked of {kid} is not true or false")
    return KeyEntry(
        kid=kid,
        agent=agent,
        public_key=public_key,
        created_at=_number(item["created_at"], "created_at"),
        expires_at=None if expires is None else _number(expires, "expires_at"),
        revoked=revoked,
    )


def _write_keyring(path: Path, entries: Sequence[KeyEntry], permissions: Mapping[str, Sequence[str]]) -> None:
    doc = {
        "version": KEYRING_VERSION,
        "keys": [e.to_json() for e in sorted(entries, key=lambda e: (e.agent, e.created_at, e.kid))],
        "permissions": {agent: list(patterns) for agent, patterns in sorted(permissions.items())},
    }
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(path.parent)


def _new_key(directory: Path, agent: str, now: float) -> KeyEntry:
    signing_key = SigningKey.generate()
    public_key = bytes(signing_key.verify_key)
    kid = key_id(public_key)
    path = directory / f"{agent}.{kid}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise KeyringError(f"private key {path} cannot be created: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(bytes(signing_key).hex().encode("ascii") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(directory)
    return KeyEntry(kid=kid, agent=agent, public_key=public_key, created_at=now, verify_key=signing_key.verify_key)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
