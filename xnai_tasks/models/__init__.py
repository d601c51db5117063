"""Models: which files (manifest, checksums, assembly), loading them, holding them, and inference.

* :mod:`.manifest`, :mod:`.model_file`: the default models and the model a role uses, verified
  (:mod:`.checksums`; the default GGUF is assembled once by :mod:`.assembly` into ``XNAI_HOME/models/``).
* :mod:`.probe`, :mod:`.probe_runner`: whether the LLM runs on this CPU, and with which llama.cpp options.
* :mod:`.loading`, :mod:`.ggml`: loading on CPU; nothing is fetched from a model hub.
* :mod:`.holder`, :mod:`.registry`: a role's models, preloaded in the worker parent before fork (no
  inference there: llama.cpp's OpenMP pool would hang the children) or lazily in a child, under a RAM cap.
* :mod:`.inference`: :func:`generate`, :func:`embed`, :func:`chunk_text`, :func:`cosine`.

The project imports from those modules. The names below are a convenience for scripts and notebooks,
imported from their module when first used: importing this package alone (the probe runner, a fresh
process that must start fast) loads none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xnai_tasks.models.checksums import sha256_file
    from xnai_tasks.models.holder import ModelHolder, RamBudget
    from xnai_tasks.models.inference import Generation, chunk_text, cosine, embed, generate
    from xnai_tasks.models.loading import LLM, Encoder, load_encoder, load_llm, set_encoder_threads, set_llm_threads
    from xnai_tasks.models.manifest import MANIFEST_PATH, ModelKind, load_manifest
    from xnai_tasks.models.model_file import ModelFile, model_footprints, models_dir, resolve_model
    from xnai_tasks.models.progress import Progress
    from xnai_tasks.models.registry import ModelRegistry

_HOME = {
    "sha256_file": "checksums",
    "ModelHolder": "holder",
    "RamBudget": "holder",
    "Generation": "inference",
    "chunk_text": "inference",
    "cosine": "inference",
    "embed": "inference",
    "generate": "inference",
    "LLM": "loading",
    "Encoder": "loading",
    "load_encoder": "loading",
    "load_llm": "loading",
    "set_encoder_threads": "loading",
    "set_llm_threads": "loading",
    "MANIFEST_PATH": "manifest",
    "ModelKind": "manifest",
    "load_manifest": "manifest",
    "ModelFile": "model_file",
    "model_footprints": "model_file",
    "models_dir": "model_file",
    "resolve_model": "model_file",
    "Progress": "progress",
    "ModelRegistry": "registry",
}

__all__ = [
    "LLM",
    "MANIFEST_PATH",
    "Encoder",
    "Generation",
    "ModelFile",
    "ModelHolder",
    "ModelKind",
    "ModelRegistry",
    "Progress",
    "RamBudget",
    "chunk_text",
    "cosine",
    "embed",
    "generate",
    "load_encoder",
    "load_llm",
    "load_manifest",
    "model_footprints",
    "models_dir",
    "resolve_model",
    "set_encoder_threads",
    "set_llm_threads",
    "sha256_file",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
