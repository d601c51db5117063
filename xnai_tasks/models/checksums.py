"""Checksums of model files, computed once: a file's sha256 is remembered by path, size and mtime."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from xnai_tasks.core.files import read_json_object, write_json_atomic
from xnai_tasks.errors import ModelError
from xnai_tasks.models.progress import Progress

log = logging.getLogger(__name__)

BLOCK = 1024 * 1024
_MiB = 1024 * 1024


class VerifiedCache:
    """Checksums already computed, keyed by path and valid while size and mtime are unchanged (JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        hit = read_json_object(self.path).get(str(path.resolve()))
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return str(hit.get("sha256"))
        return None

    def store(self, path: Path, st: os.stat_result, sha256: str) -> None:
        data = read_json_object(self.path)
        data[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
        try:
            write_json_atomic(self.path, data)
        except OSError as exc:
            log.warning("cannot record the checksum of %s in %s: %s", path, self.path, exc)


def sha256_file(path: Path, label: str | None = None) -> str:
    """sha256 of a file, with a progress bar for big files."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with Progress(label or f"hashing {path.name}", size, min_bytes=16 * _MiB) as bar, path.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def sidecar_sha256(path: Path) -> str | None:
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return None
    words = sidecar.read_text(encoding="utf-8").split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        raise ModelError(f"{sidecar} does not start with a sha256")
    return words[0].lower()


def verify_file(path: Path, size: int, sha256: str, cache: VerifiedCache, label: str) -> None:
    """Existence, size, then checksum (remembered by path, size and mtime)."""
    try:
        st = path.stat()
    except OSError:
        raise ModelError(f"model {label}: {path} is missing") from None
    if st.st_size != size:
        raise ModelError(f"model {label}: {path} is {st.st_size} bytes, expected {size} (truncated or replaced)")
    actual = cache.lookup(path, st)
    if actual is None:
        actual = sha256_file(path, f"checking {path.name}")
        cache.store(path, st, actual)
    if actual != sha256:
        raise ModelError(f"model {label}: {path} has sha256 {actual[:12]}…, expected {sha256[:12]}…")
