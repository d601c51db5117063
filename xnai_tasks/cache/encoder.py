"""The encoder a semantic lookup embeds request texts with: the workers' own, loaded the way they load it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from xnai_tasks.models import inference
from xnai_tasks.models.holder import ModelHolder
from xnai_tasks.models.loading import Encoder
from xnai_tasks.models.registry import ModelRegistry
from xnai_tasks.plan.host import plan_for
from xnai_tasks.settings import Settings

#: The role whose encoder a process outside the workers (``xnai cache eval``) uses: the copilot's.
ENCODER_ROLE: Final = "copilot"


def cache_encoder(settings: Settings) -> ModelHolder[Encoder]:
    """The encoder of :data:`ENCODER_ROLE` from the model registry (manifest default or XNAI_ENCODER_MODEL,
    verified, local files only), loaded lazily in this process."""
    plan = replace(plan_for(settings).roles[ENCODER_ROLE], model_mode="lazy")
    return ModelRegistry.for_role(ENCODER_ROLE, settings, plan).encoder


def embed_texts(holder: ModelHolder[Encoder], texts: Sequence[str]) -> list[list[float]]:
    """The encoder's L2-normalised vectors of ``texts``, in order."""
    batch_size = int(holder.model.params.get("batch_size", 32))
    with holder.use() as encoder:
        return inference.embed(encoder, texts, batch_size=batch_size)
