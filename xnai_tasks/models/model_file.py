"""Which model file a role uses: the manifest default (verified, assembled if needed) or the one a setting names.

An encoder folder's checksum is ``tree-v1``: the sha256 of the sorted lines ``<relative path>\\0<sha256 of the
file>\\n`` over the files the manifest lists (weights, config, tokenizer), so any changed file changes it and
each file is reported on its own. Weights in PyTorch's object-serialized form (``pytorch_model.bin``) are
refused: only safetensors are loaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xnai_tasks.errors import ModelError
from xnai_tasks.models.assembly import assemble, package_dir
from xnai_tasks.models.checksums import VerifiedCache, sidecar_sha256, verify_file
from xnai_tasks.models.manifest import MANIFEST_PATH, ManifestEntry, ModelKind, load_manifest
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

#: Folder under XNAI_HOME holding assembled models and the verification cache.
MODELS_DIR = "models"
VERIFIED_FILE = "verified.json"
GGUF_MAGIC = b"GGUF"
#: Prompting parameters that belong to the default model only (another GGUF uses its own chat template).
_PROMPT_PARAMS = ("prompt_format", "completion_template", "stop")
_MiB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ModelFile:
    """A resolved model: where it is, how big, whether its checksum was checked, and its parameters."""

    name: str
    kind: ModelKind
    path: Path
    size_bytes: int
    sha256: str | None
    checked: bool
    ram_bytes: int
    params: Mapping[str, Any]
    default: bool

    @property
    def max_length(self) -> int:
        """An encoder's longest input in tokens (its ``max_length`` parameter; 256 unless the manifest says)."""
        return int(self.params.get("max_length", 256))


def models_dir(settings: Settings) -> Path:
    """``XNAI_HOME/models``, created if needed."""
    path = settings.home / MODELS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(kind: ModelKind, settings: Settings, manifest: Path | None = None) -> ModelFile:
    """The model of ``kind`` to use: the setting's path if given, else the verified manifest default."""
    entries = load_manifest(manifest)
    if kind not in entries:
        raise ModelError(f"the model manifest has no {kind} model")
    entry = entries[kind]
    cache = VerifiedCache(models_dir(settings) / VERIFIED_FILE)
    if kind == "gguf":
        if settings.llm_model is not None:
            return _gguf_override(settings.llm_model, entry, cache)
        return _gguf_default(entry, settings, cache, (manifest or MANIFEST_PATH).parent)
    if settings.encoder_model is not None:
        return _encoder_override(settings.encoder_model, entry)
    return _encoder_default(entry, cache, (manifest or MANIFEST_PATH).parent)


def _gguf_default(entry: ManifestEntry, settings: Settings, cache: VerifiedCache, base: Path) -> ModelFile:
    if "path" in entry.source:
        path = _source_path(entry.source["path"], base)
        verify_file(path, entry.size_bytes, entry.sha256, cache, entry.name)
    else:
        path = models_dir(settings) / (entry.file or f"{entry.name}.gguf")
        try:
            if not path.exists():
                raise ModelError(f"{path} does not exist")
            verify_file(path, entry.size_bytes, entry.sha256, cache, entry.name)
        except ModelError as exc:
            if path.exists():
                log.warning("re-assembling %s: %s", path, exc)
            assemble(entry, path, cache)
    return ModelFile(
        name=entry.name,
        kind="gguf",
        path=path,
        size_bytes=entry.size_bytes,
        sha256=entry.sha256,
        checked=True,
        ram_bytes=entry.ram_bytes,
        params=entry.params,
        default=True,
    )


def _gguf_override(path: Path, entry: ManifestEntry, cache: VerifiedCache) -> ModelFile:
    """A GGUF named by XNAI_LLM_MODEL: must be a GGUF file; checked against ``<file>.sha256`` if present."""
    if not path.is_file():
        raise ModelError(f"XNAI_LLM_MODEL={path} is missing or not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"XNAI_LLM_MODEL={path} is not a GGUF file (bad magic)")
    expected = sidecar_sha256(path)
    if expected is not None:
        verify_file(path, size, expected, cache, path.name)
    ram = _gguf_ram(size)
    params = {k: v for k, v in entry.params.items() if k not in _PROMPT_PARAMS}
    return ModelFile(
        name=path.stem,
        kind="gguf",
        path=path,
        size_bytes=size,
        sha256=expected,
        checked=expected is not None,
        ram_bytes=ram,
        params=params,
        default=False,
    )


def _encoder_default(entry: ManifestEntry, cache: VerifiedCache, base: Path) -> ModelFile:
    if "path" in entry.source:
        folder = _source_path(entry.source["path"], base)
    else:
        folder = package_dir(entry.source["package"]) / entry.source.get("subdir", "")
    digest = hashlib.sha256()
    for rel in sorted(entry.files):
        size, sha = entry.files[rel]
        verify_file(folder / rel, size, sha, cache, f"{entry.name}/{rel}")
        digest.update(f"{rel}\0{sha}\n".encode())
    if digest.hexdigest() != entry.sha256:
        raise ModelError(f"model manifest entry {entry.name}: its files do not add up to sha256 {entry.sha256}")
    return ModelFile(
        name=entry.name,
        kind="encoder",
        path=folder,
        size_bytes=entry.size_bytes,
        sha256=entry.sha256,
        checked=True,
        ram_bytes=entry.ram_bytes,
        params=entry.params,
        default=True,
    )


def _encoder_override(folder: Path, entry: ManifestEntry) -> ModelFile:
    """An encoder folder named by XNAI_ENCODER_MODEL: config, tokenizer and safetensors weights present."""
    if not folder.is_dir():
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        unsafe = [p.name for p in folder.glob("*.bin")]
        hint = f" ({', '.join(unsafe)} is an unsafe object-serialized file, refused)" if unsafe else ""
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} has no .safetensors weights{hint}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} has no tokenizer files")
    size = _folder_size(folder)
    ram = _encoder_ram(size)
    return ModelFile(
        name=folder.name,
        kind="encoder",
        path=folder,
        size_bytes=size,
        sha256=None,
        checked=False,
        ram_bytes=ram,
        params=entry.params,
        default=False,
    )


def _gguf_ram(size: int) -> int:
    """Expected resident footprint of a GGUF of ``size`` bytes (weights, repacking, context)."""
    return int(size * 1.1) + 256 * _MiB


def _encoder_ram(size: int) -> int:
    """Expected resident footprint of an encoder folder of ``size`` bytes."""
    return int(size * 1.3) + 32 * _MiB


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_footprints(settings: Settings, manifest: Path | None = None) -> dict[ModelKind, int]:
    """Expected RAM of the LLM and the encoder, for the plan: cheap (no checksum, no assembly)."""
    entries = load_manifest(manifest)
    sizes: dict[ModelKind, int] = {kind: entry.ram_bytes for kind, entry in entries.items()}
    if settings.llm_model is not None and settings.llm_model.is_file():
        sizes["gguf"] = _gguf_ram(settings.llm_model.stat().st_size)
    if settings.encoder_model is not None and settings.encoder_model.is_dir():
        sizes["encoder"] = _encoder_ram(_folder_size(settings.encoder_model))
    return sizes


def _source_path(raw: str, base: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base / path)
