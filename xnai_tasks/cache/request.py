"""What a semantic lookup compares: a request's text, and the scope it must share with an earlier request.

A request's **text** is its prompt-like keyword argument, the one that says in words what is asked
(:data:`PROMPT_KWARGS`), with its whitespace collapsed. Every other keyword argument (``context``,
``language``, ``options``, ``max_tokens``, ``seed``...) is part of its **scope**, with the role and the task:
two requests are compared only when their scopes are equal, so the encoder and the guard judge wording
alone. (The cache also keeps requests of different models apart.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from xnai_tasks.errors import UsageError

#: The keyword argument holding each semantically cacheable task's request in words.
PROMPT_KWARGS: Final[Mapping[tuple[str, str], str]] = {
    ("cline", "generate_docs"): "topic",
    ("cline", "generate_code"): "spec",
    ("grok", "synthesize"): "prompt",
    ("grok", "analyze"): "question",
}


@dataclass(frozen=True, kw_only=True)
class Request:
    """A request as a semantic lookup sees it: the text compared, and the scope that must match exactly."""

    role: str
    task: str
    text: str
    #: Role, task and every other keyword argument, as canonical JSON.
    scope: str


def request_text(role: str, task: str, kwargs: Mapping[str, Any]) -> Request:
    """The request ``role.task(**kwargs)`` as a semantic lookup compares it.

    Raises :class:`UsageError` for a task with no prompt-like argument (nothing to compare in words) or
    a request without that argument.
    """
    name = PROMPT_KWARGS.get((role, task))
    if name is None:
        known = ", ".join(f"{r}.{t}" for r, t in PROMPT_KWARGS)
        raise UsageError(f"{role}.{task} has no request text to compare (semantic cache: {known})")
    value = kwargs.get(name)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{role}.{task} needs a non-empty {name} for a semantic lookup")
    rest = {key: kwargs[key] for key in sorted(kwargs) if key != name}
    scope = json.dumps({"role": role, "task": task, "kwargs": rest}, sort_keys=True, separators=(",", ":"))
    return Request(role=role, task=task, text=" ".join(value.split()), scope=scope)
