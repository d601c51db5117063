"""Which requests the response cache may answer, and how (``off``, ``exact``, ``semantic``).

Only a deterministic answer is cached unless the submission asks: an encoder task always (its vectors depend
on the text and the model only), an LLM task when it samples with temperature 0 or a fixed seed. Tasks that
read changing state (``curation.search`` reads the memory bank, ``index`` writes it) or describe the process
(``health``, ``echo``) are never cached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from xnai_tasks.cache.request import PROMPT_KWARGS
from xnai_tasks.errors import UsageError

#: What a submission may ask for; None asks for the default (exact when deterministic, else off).
MODES: Final = ("off", "exact", "semantic")
#: The message header carrying the mode the client settled on, read by the worker that stores the answer.
CACHE_HEADER: Final = "xnai_cache"

#: Tasks whose answer depends only on their arguments and the encoder.
ENCODER_TASKS: Final = frozenset({("curation", "embed"), ("curation", "classify")})
#: Tasks whose answer depends on their arguments and the LLM's sampling.
LLM_TASKS: Final = frozenset(PROMPT_KWARGS)


def cacheable(role: str, task: str) -> bool:
    """Whether answers of ``role.task`` may be cached at all."""
    return (role, task) in ENCODER_TASKS or (role, task) in LLM_TASKS


def deterministic(role: str, task: str, kwargs: Mapping[str, Any]) -> bool:
    """The same request gives the same answer: an encoder task, or an LLM task at temperature 0 or with a seed."""
    if (role, task) in ENCODER_TASKS:
        return True
    if (role, task) not in LLM_TASKS:
        return False
    temperature = kwargs.get("temperature")
    return kwargs.get("seed") is not None or (isinstance(temperature, int | float) and temperature == 0)


def cache_mode(role: str, task: str, kwargs: Mapping[str, Any], requested: str | None, *, enabled: bool) -> str:
    """The mode a request gets: ``requested`` if given (``exact``/``semantic`` on a task that can be cached),
    else ``exact`` for a deterministic one; always ``off`` when the cache is off (XNAI_CACHE=off).
    UsageError for an unknown mode."""
    if requested is not None and requested not in MODES:
        raise UsageError(f"cache must be one of {', '.join(MODES)}, not {requested!r}")
    if not enabled or requested == "off" or not cacheable(role, task):
        return "off"
    if requested == "semantic" and (role, task) not in PROMPT_KWARGS:
        return "exact"  # nothing to compare in words: the exact lookup still applies
    if requested is not None:
        return requested
    return "exact" if deterministic(role, task, kwargs) else "off"
