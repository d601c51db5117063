"""The ACL users' passwords: ``XNAI_HOME/acl/passwords.json`` (mode 0600), one random password per user.

Generated once, on first use; a user added later gets a password of its own and the others keep theirs.
The embedded Redis loads only their hashes (:func:`xnai_tasks.security.acl.render_acl`).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from xnai_tasks.core.files import write_atomic
from xnai_tasks.errors import SettingsError
from xnai_tasks.security.acl import USERS

ACL_DIR: Final = "acl"
PASSWORDS_FILE: Final = "passwords.json"


def passwords_path(home: Path) -> Path:
    """Path of ``passwords.json``."""
    return home / ACL_DIR / PASSWORDS_FILE


def ensure_passwords(home: Path) -> dict[str, str]:
    """One random password per ACL user in ``HOME/acl/passwords.json`` (mode 0600), created once.

    Raises :class:`SettingsError` when the file is readable by others or malformed.
    """
    path = passwords_path(home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        _create_exclusive(path, {user: secrets.token_hex(32) for user in USERS})
    passwords = _load_passwords(path)
    missing = [user for user in USERS if user not in passwords]
    if missing:  # a file written before a user was added: keep the old passwords, add the new ones
        passwords.update({user: secrets.token_hex(32) for user in missing})
        write_atomic(path, _serialized(passwords), mode=0o600, durable=True)
    return passwords


def _create_exclusive(path: Path, passwords: Mapping[str, str]) -> None:
    """Write a complete file under a temporary name, then link it in place: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _write_private(tmp, passwords)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first; use theirs
    finally:
        tmp.unlink(missing_ok=True)


def _serialized(passwords: Mapping[str, str]) -> bytes:
    return json.dumps(dict(passwords), indent=1, sort_keys=True).encode("utf-8")


def _write_private(path: Path, passwords: Mapping[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(_serialized(passwords))
        fh.flush()
        os.fsync(fh.fileno())


def _load_passwords(path: Path) -> dict[str, str]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SettingsError(f"{path} has mode {mode:04o}, readable by others: run chmod 600 {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
        raise SettingsError(f"{path} must hold a JSON object of user name to password")
    return dict(data)
