"""The keyring on disk under ``XNAI_HOME/keys``: its format, and locked, permission-checked reads and writes.

Layout: ``keyring.json`` holds the public keys, their life cycle (created, expires, revoked) and each
agent's permissions; each private key is its own ``AGENT.KID.key`` file (hex seed, mode 0600). The
keyring file is replaced atomically and changed under a lock; a file or directory others may write to
is refused. Private keys are never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from nacl.signing import SigningKey

from xnai_tasks.core import constants as c
from xnai_tasks.core.files import sync_folder, write_atomic
from xnai_tasks.errors import KeyringError
from xnai_tasks.security.key_pair import KeyEntry, key_id

KEYS_DIR: Final = "keys"
KEYRING_FILE: Final = "keyring.json"
LOCK_FILE: Final = ".lock"
KEYRING_VERSION: Final = 1

_AGENT_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_KID_RE: Final = re.compile(r"[0-9a-f]{16}")
_TASK_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MAX_KEY_FILE: Final = 4096
_MAX_KEYRING_FILE: Final = 16 * 1024 * 1024

#: Each agent's permission patterns, as written in the file.
Permissions = dict[str, list[str]]
#: A file's identity and version, to notice that it changed: inode, mtime and size (None: no file).
Stamp = tuple[int, int, int] | None


def keys_dir(home: Path) -> Path:
    """Directory holding the keyring and the private keys."""
    return home / KEYS_DIR


def keyring_path(home: Path) -> Path:
    """Path of ``keyring.json``."""
    return home / KEYS_DIR / KEYRING_FILE


def private_key_path(home: Path, agent: str, kid: str) -> Path:
    """Path of one private key file."""
    return home / KEYS_DIR / f"{agent}.{kid}.key"


def check_agent(agent: str) -> None:
    """Raise KeyringError unless ``agent`` is a valid agent name."""
    if not isinstance(agent, str) or not _AGENT_RE.fullmatch(agent):
        raise KeyringError(f"bad agent name {agent!r}: lower-case letters, digits, '_' or '-', at most 32")


def parse_pattern(pattern: str) -> tuple[str, str]:
    """Split a permission pattern ``ROLE.TASK`` (either part may be ``*``); raise KeyringError if bad."""
    role, dot, task = pattern.partition(".") if isinstance(pattern, str) else ("", "", "")
    if not dot or not (role == "*" or role in c.ROLES) or not (task == "*" or _TASK_RE.fullmatch(task)):
        raise KeyringError(
            f"bad permission pattern {pattern!r}: expected ROLE.TASK with ROLE one of "
            f"{', '.join(c.ROLES)} or '*', and TASK a task name or '*'"
        )
    return role, task


def stamp(path: Path) -> Stamp:
    """The file's :data:`Stamp`, or None when it cannot be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@contextlib.contextmanager
def locked(home: Path) -> Iterator[Path]:
    """Hold the keyring's lock (creating a safe key directory first); yields the key directory."""
    directory = _ensure_dir(home)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory
    finally:
        os.close(fd)


def read_seed(path: Path) -> bytes:
    """The 32-byte seed in a private key file; KeyringError (naming the file) if missing, loose or malformed."""
    fd = _open_checked(path, "private key", 0o077, "chmod 600")
    raw = _read_fd(fd, _MAX_KEY_FILE)
    if len(raw) > _MAX_KEY_FILE:
        raise KeyringError(f"private key {path} is malformed (too large)")
    try:
        seed = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        seed = b""
    if len(seed) != 32:
        raise KeyringError(f"private key {path} is malformed (expected 64 hex characters)")
    return seed


def read_or_empty(path: Path) -> tuple[list[KeyEntry], Permissions]:
    """The keyring file's keys and permissions; none of either when there is no file yet."""
    if not path.exists():
        return [], {}
    return read_keyring(path)


def read_keyring(path: Path) -> tuple[list[KeyEntry], Permissions]:
    """The keyring file's keys and permissions; KeyringError names the file on any problem."""
    if not path.exists():
        raise KeyringError(f"no keyring at {path}; run `xnai keys init`")
    fd = _open_checked(path, "keyring", 0o022, "chmod 644")
    raw = _read_fd(fd, _MAX_KEYRING_FILE)
    try:
        doc = json.loads(raw)
        return parse_keyring(doc)
    except (ValueError, TypeError, KeyError, AttributeError, KeyringError) as exc:
        raise KeyringError(f"keyring {path} is malformed: {exc}") from None


def write_keyring(path: Path, entries: Sequence[KeyEntry], permissions: Mapping[str, Sequence[str]]) -> None:
    """Replace the keyring file atomically (call it under :func:`locked`)."""
    doc = {
        "version": KEYRING_VERSION,
        "keys": [e.to_json() for e in sorted(entries, key=lambda e: (e.agent, e.created_at, e.kid))],
        "permissions": {agent: list(patterns) for agent, patterns in sorted(permissions.items())},
    }
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
    write_atomic(path, data, mode=0o644, durable=True)


def new_key(directory: Path, agent: str, now: float) -> KeyEntry:
    """Generate a key pair for ``agent``, write its private key file (mode 0600) and return its public entry."""
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
    sync_folder(directory)
    return KeyEntry(kid=kid, agent=agent, public_key=public_key, created_at=now, verify_key=signing_key.verify_key)


def unlink_quiet(path: Path) -> None:
    """Delete a file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ---- parsing ----


def parse_keyring(doc: Any) -> tuple[list[KeyEntry], Permissions]:
    """The keys and permissions of a keyring file's JSON; ValueError, TypeError, KeyError, AttributeError or
    KeyringError on any problem (:func:`read_keyring` names the file)."""
    if not isinstance(doc, dict) or doc.get("version") != KEYRING_VERSION:
        raise ValueError(f"expected an object with version {KEYRING_VERSION}")
    entries = [_parse_entry(item) for item in doc["keys"]]
    if len({e.kid for e in entries}) != len(entries):
        raise ValueError("duplicate key id")
    permissions: Permissions = {}
    if not isinstance(doc["permissions"], dict):
        raise ValueError("permissions is not an object")
    for agent, patterns in doc["permissions"].items():
        check_agent(agent)
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
    check_agent(agent)
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


# ---- files and directories ----


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
