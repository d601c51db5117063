"""A role's models: its LLM and/or encoder, resolved and verified, in the mode the role's plan gives."""

from __future__ import annotations

import gc
from functools import partial
from pathlib import Path
from typing import Any

from xnai_tasks.errors import ModelError
from xnai_tasks.models.holder import DEFAULT_KEEP_ALIVE_SECONDS, ModelHolder, RamBudget
from xnai_tasks.models.loading import LLM, Encoder, load_encoder, load_llm
from xnai_tasks.models.model_file import resolve_model
from xnai_tasks.observability.metrics import set_model_loaded
from xnai_tasks.plan.planner import RolePlan, role_models
from xnai_tasks.settings import Settings


class ModelRegistry:
    """A role's models: the LLM and/or the encoder, in the role plan's mode."""

    def __init__(self, llm: ModelHolder[LLM] | None = None, encoder: ModelHolder[Encoder] | None = None) -> None:
        self._llm = llm
        self._encoder = encoder

    @classmethod
    def for_role(
        cls,
        role: str,
        settings: Settings,
        plan: RolePlan,
        *,
        keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS,
        manifest: Path | None = None,
        ram_cap_bytes: int | None = None,
    ) -> ModelRegistry:
        """Resolve (and verify) the role's models; nothing is loaded yet.

        ``ram_cap_bytes`` caps what the lazily loaded models of one process may hold together.
        """
        kinds = role_models(role)
        threads = plan.threads_per_process
        budget = RamBudget(ram_cap_bytes)
        llm: ModelHolder[LLM] | None = None
        encoder: ModelHolder[Encoder] | None = None

        def llm_options() -> dict[str, Any]:
            return dict(llm.load_options) if llm is not None else {}

        if "gguf" in kinds:
            gguf = resolve_model("gguf", settings, manifest)
            n_ctx = int(gguf.params.get("n_ctx", 2048))
            llm = ModelHolder(
                gguf,
                lambda: load_llm(gguf.path, n_ctx, threads, params=gguf.params, options=llm_options()),
                plan.model_mode,
                keep_alive=keep_alive,
                budget=budget,
                on_change=partial(set_model_loaded, role, gguf.name),
            )
        if "encoder" in kinds:
            enc = resolve_model("encoder", settings, manifest)
            max_length = enc.max_length
            encoder = ModelHolder(
                enc,
                lambda: load_encoder(enc.path, threads, max_length=max_length),
                plan.model_mode,
                keep_alive=keep_alive,
                budget=budget,
                on_change=partial(set_model_loaded, role, enc.name),
            )
        return cls(llm, encoder)

    @property
    def llm(self) -> ModelHolder[LLM]:
        if self._llm is None:
            raise ModelError("this role has no LLM")
        return self._llm

    @property
    def encoder(self) -> ModelHolder[Encoder]:
        if self._encoder is None:
            raise ModelError("this role has no encoder")
        return self._encoder

    def holders(self) -> list[ModelHolder[Any]]:
        return [h for h in (self._llm, self._encoder) if h is not None]

    def preload(self) -> None:
        """Load the preload-mode models now, then ``gc.freeze()``; call in the parent just before forking.

        No inference may run in this process afterwards if it is going to fork (llama.cpp/OpenMP hang).
        """
        for holder in self.holders():
            if holder.mode == "preload" and holder.unavailable is None:
                holder.load()
        gc.collect()
        gc.freeze()

    def describe(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self.holders()]

    def close(self) -> None:
        for holder in self.holders():
            holder.close()


# ---------------------------------------------------------------- inference helpers
