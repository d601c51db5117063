"""Checks of a role task's arguments: a bad one is a usage error naming it (CLI exit 2)."""

from __future__ import annotations

from typing import Any

from xnai_tasks.errors import UsageError


def require_text(name: str, value: Any, *, max_chars: int = 100_000) -> str:
    """``value`` as a non-empty string, or a :class:`UsageError` naming the argument."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{name} must be a non-empty string")
    if len(value) > max_chars:
        raise UsageError(f"{name} is {len(value)} characters, more than {max_chars}")
    return value


def optional_text(name: str, value: Any) -> str | None:
    """None, or ``value`` checked like :func:`require_text`."""
    return None if value is None else require_text(name, value)


def require_texts(name: str, value: Any, *, max_items: int = 10_000) -> list[str]:
    """A non-empty list of non-empty strings."""
    if not isinstance(value, list) or not value:
        raise UsageError(f"{name} must be a non-empty list of strings")
    if len(value) > max_items:
        raise UsageError(f"{name} has {len(value)} items, more than {max_items}")
    return [require_text(f"{name}[{i}]", item) for i, item in enumerate(value)]


def require_count(name: str, value: Any, low: int, high: int) -> int:
    """An integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{name} must be a whole number from {low} to {high}, not {value!r}")
    return value
