"""How big and how deep a task's arguments may be: checked at submit and again in the worker's gate.

A 900-deep nested argument decodes, then breaks the worker parent (``RecursionError``) while it hands
the task to its pool; NaN and infinity are not JSON and cannot be signed. Both are refused at the door.
"""

from __future__ import annotations

import json
from typing import Any

from xnai_tasks.errors import UsageError

#: How deep lists and objects may nest in a message body: far more than any task needs.
MAX_DEPTH = 32
#: The largest message body a worker accepts (a role's documents to index are the biggest bodies).
MAX_BODY_BYTES = 8 * 1024 * 1024


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and objects nest in ``value``, counted without recursion up to ``limit + 1``
    (it stops looking there: anything deeper than ``limit`` is too deep)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list | tuple):
            deepest = max(deepest, level)
            if level <= limit:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, level + 1) for child in children)
    return deepest


def check_arguments(name: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`UsageError` unless ``kwargs`` are strict JSON nested at most :data:`MAX_DEPTH` deep."""
    found = depth(kwargs)
    if found > MAX_DEPTH:
        raise UsageError(f"{name}: arguments nest more than {MAX_DEPTH} levels deep")
    try:
        text = json.dumps(kwargs, allow_nan=False)
    except ValueError as exc:
        raise UsageError(f"{name}: arguments are not plain JSON ({exc}): NaN and infinity are not allowed") from None
    except TypeError as exc:
        raise UsageError(f"{name}: arguments are not JSON: {exc}") from None
    if len(text) > MAX_BODY_BYTES:
        raise UsageError(f"{name}: arguments are {len(text)} bytes as JSON, more than {MAX_BODY_BYTES}")
