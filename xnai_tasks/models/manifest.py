"""The manifest of default models (``manifest.json`` in this package): each one, its source and checksum."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xnai_tasks.errors import ModelError

ModelKind = Literal["gguf", "encoder"]
MODEL_KINDS: tuple[ModelKind, ...] = ("gguf", "encoder")

#: The manifest of default models, shipped inside the package.
MANIFEST_PATH = Path(__file__).resolve().parent / "manifest.json"


@dataclass(frozen=True, kw_only=True)
class ManifestEntry:
    """One default model as the manifest describes it."""

    name: str
    kind: ModelKind
    source: Mapping[str, str]
    size_bytes: int
    sha256: str
    ram_bytes: int
    params: Mapping[str, Any]
    file: str | None = None
    #: Encoder only: relative path -> (size in bytes, sha256).
    files: Mapping[str, tuple[int, str]] = field(default_factory=dict)


def load_manifest(path: Path | None = None) -> dict[ModelKind, ManifestEntry]:
    """Read the manifest; one entry per kind."""
    path = MANIFEST_PATH if path is None else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries: dict[ModelKind, ManifestEntry] = {}
        for raw in data["models"]:
            kind = raw["kind"]
            if kind not in MODEL_KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            files = {rel: (int(v["size_bytes"]), str(v["sha256"])) for rel, v in raw.get("files", {}).items()}
            entries[kind] = ManifestEntry(
                name=raw["name"],
                kind=kind,
                source=dict(raw["source"]),
                size_bytes=int(raw["size_bytes"]),
                sha256=str(raw["sha256"]),
                ram_bytes=int(raw["ram_bytes"]),
                params=dict(raw.get("params", {})),
                file=raw.get("file"),
                files=files,
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model manifest {path} is unreadable: {exc}") from None
    return entries
