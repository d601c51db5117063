"""Files under XNAI_HOME replaced atomically (a temporary file beside them, then a rename), JSON state files, and
private files read with their mode."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; an empty dict when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_private(path: Path, limit: int) -> tuple[bytes, int]:
    """Up to ``limit + 1`` bytes of ``path`` and its permission bits, through one descriptor (so the mode checked is
    that of the file read; a symlink is refused). Raises OSError (FileNotFoundError) as ``os.open`` does."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit + 1), stat.S_IMODE(os.fstat(fh.fileno()).st_mode)


def write_atomic(path: Path, data: bytes, *, mode: int, durable: bool = False) -> None:
    """Write ``data`` to a new temporary file beside ``path`` created with ``mode``, then rename it into place.

    Readers see the old file or the new one, never half of one, and a secret is never readable by others,
    not even for a moment (the file is created with its final mode; a symlink in its place is refused).
    ``durable`` syncs the file and its folder, so the new content survives a power cut. Raises OSError.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename or a new file in it is on disk (where the file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (mode 0644) with :func:`write_atomic`. Raises OSError when it cannot be written."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"), mode=0o644)
