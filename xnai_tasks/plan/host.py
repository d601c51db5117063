"""The plan for this host and these settings: the planner fed with the host, the settings and the models' sizes.

Kept apart from :mod:`.planner` (pure: no settings, no files) because it reads the model manifest, and the
models module reads the planner's decisions.
"""

from __future__ import annotations

from typing import cast

from xnai_tasks.core import constants as c
from xnai_tasks.errors import SettingsError
from xnai_tasks.models.model_file import model_footprints
from xnai_tasks.plan.planner import Host, MiB, ModelMode, Plan, RoleOverride, detect_host, make_plan
from xnai_tasks.settings import Settings


def plan_for(settings: Settings, host: Host | None = None) -> Plan:
    """The plan for this host and these settings (XNAI_RESERVED_CORES, XNAI_MODEL_MODE, XNAI_PLAN, models)."""
    footprints = model_footprints(settings)
    overrides: dict[str, RoleOverride] = {
        role: cast(RoleOverride, dict(fields)) for role, fields in settings.plan_override_map.items()
    }
    if settings.model_mode != "auto":
        for role in c.ROLES:
            overrides.setdefault(role, {}).setdefault("model_mode", cast(ModelMode, settings.model_mode))
    try:
        return make_plan(
            host or detect_host(),
            settings.reserved_cores,
            overrides,
            llm_bytes=footprints["gguf"],
            encoder_bytes=footprints["encoder"],
            redis_maxmemory_bytes=(settings.redis_maxmemory_mb or 0) * MiB or None,
        )
    except SettingsError as exc:
        if settings.plan_overrides is not None and str(exc).startswith("plan"):
            raise SettingsError(f"XNAI_PLAN: {exc}") from None
        raise
