"""Loading models on CPU: a GGUF through llama.cpp, an encoder folder through transformers; nothing from a hub."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xnai_tasks.errors import ModelError
from xnai_tasks.models.ggml import load_ggml_backends
from xnai_tasks.models.progress import Progress

if TYPE_CHECKING:
    from llama_cpp import Llama

#: llama.cpp model parameters a load may set (llama-cpp-python's ``Llama`` has no argument for them).
LOAD_OPTION_FIELDS = ("use_extra_bufts",)
#: One load at a time swaps llama-cpp-python's default-params function (see :func:`_model_params`).
_params_lock = threading.Lock()


@dataclass(kw_only=True)
class LLM:
    """A loaded llama.cpp model and how it is prompted."""

    llama: Llama
    path: Path
    n_ctx: int
    n_threads: int
    #: ``"chat"`` uses the model's chat template; ``"completion"`` fills ``completion_template``.
    prompt_format: str = "chat"
    completion_template: str = "{prompt}"
    stop: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: llama.cpp model parameters the model was loaded with (empty: llama.cpp's defaults).
    load_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Encoder:
    """A loaded transformers encoder (tokenizer + model), CPU, eval mode; mean pooling, L2-normalised."""

    tokenizer: Any
    model: Any
    path: Path
    threads: int
    max_length: int = 256


def load_llm(
    path: Path,
    n_ctx: int,
    n_threads: int,
    *,
    n_threads_batch: int | None = None,
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> LLM:
    """Load a GGUF with llama.cpp (mmap, no mlock). Do not run inference before a fork.

    ``options`` are the llama.cpp model parameters the probe settled on (:mod:`xnai_tasks.models.probe`),
    e.g. ``{"use_extra_bufts": False}``: weight repacking off, the safe choice where it crashes.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ModelError("llama-cpp-python is not installed (pip install 'xnai-tasks[models]')") from None
    params = params or {}
    load_ggml_backends()
    with Progress(f"loading {path.name}", None), _model_params(dict(options or {})):
        try:
            llama = Llama(
                model_path=str(path),
                use_mmap=True,
                use_mlock=False,
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch or n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"llama.cpp cannot load {path}: {exc} (truncated or not a supported GGUF?)") from None
    if "tokenizer.chat_template" not in llama.metadata and llama.metadata.get("general.architecture", "").startswith(
        "gemma"
    ):
        llama.chat_format = "gemma"  # no template embedded: llama-cpp-python would fall back to llama-2
    return LLM(
        llama=llama,
        path=path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        prompt_format=str(params.get("prompt_format", "chat")),
        completion_template=str(params.get("completion_template", "{prompt}")),
        stop=tuple(params.get("stop", ())),
        defaults=params,
        load_options=dict(options or {}),
    )


@contextlib.contextmanager
def _model_params(options: dict[str, Any]) -> Iterator[None]:
    """Within the block, ``llama_model_default_params()`` returns params with ``options`` applied.

    ``Llama.__init__`` builds its model parameters from that function and offers no argument for fields
    such as ``use_extra_bufts``; swapping the function for the duration of one load is the narrowest hook.
    """
    unknown = sorted(set(options) - set(LOAD_OPTION_FIELDS))
    if unknown:
        raise ModelError(f"unknown llama.cpp load options {unknown} (known: {', '.join(LOAD_OPTION_FIELDS)})")
    if not options:
        yield
        return
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def with_options() -> Any:
        model_params = original()
        for name, value in options.items():
            setattr(model_params, name, value)
        return model_params

    with _params_lock:
        bindings.llama_model_default_params = with_options
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


def set_llm_threads(llm: LLM, n_threads: int) -> None:
    """Change the threads a loaded LLM decodes with (e.g. in a forked child)."""
    llm.llama._ctx.set_n_threads(n_threads, n_threads)
    llm.llama.n_threads = n_threads
    llm.llama.n_threads_batch = n_threads
    llm.n_threads = n_threads


def load_encoder(path: Path, threads: int, *, max_length: int = 256) -> Encoder:
    """Load an encoder folder with transformers, offline, safetensors only, CPU, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ModelError("torch/transformers are not installed (pip install 'xnai-tasks[models]')") from None
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # ours replaces its tqdm bars
    set_encoder_threads(threads)
    with Progress(f"loading {path.name}", None):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"transformers cannot load {path}: {exc}") from None
    model.to(torch.device("cpu"))
    model.eval()
    model.requires_grad_(False)
    return Encoder(tokenizer=tokenizer, model=model, path=path, threads=threads, max_length=max_length)


def set_encoder_threads(threads: int) -> None:
    """torch intra-op threads for this process (torch's setting is per process)."""
    import torch

    torch.set_num_threads(max(1, threads))


# ---------------------------------------------------------------- holders
