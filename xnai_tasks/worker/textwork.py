"""Small pure helpers of the role tasks: argument checks, code extraction and validation, sentences.

Nothing here imports a model library, so the role modules that use it stay cheap to import.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xnai_tasks.errors import UsageError

#: Languages whose generated code is checked; anything else is reported as not validated.
VALIDATED_LANGUAGES = ("python",)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


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


def extract_code(text: str, language: str) -> str:
    """The code in a model's answer: the first fenced block (preferring one tagged ``language``), else all."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text.strip("\n")
    for tag, body in blocks:
        if tag.lower() == language.lower():
            return str(body).strip("\n")
    return str(blocks[0][1]).strip("\n")


def validate_code(code: str, language: str) -> dict[str, Any]:
    """An honest report: for Python, does it parse (``ast.parse``) and compile (``compile``)? Else: not validated."""
    lang = language.lower()
    if lang not in VALIDATED_LANGUAGES:
        return {
            "language": language,
            "validated": False,
            "valid": None,
            "checks": [],
            "note": f"not validated: no validator for {language} here (validated: {', '.join(VALIDATED_LANGUAGES)})",
        }
    report: dict[str, Any] = {"language": language, "validated": True, "checks": ["ast.parse", "compile"]}
    if not code.strip():
        return report | {"parses": False, "compiles": False, "valid": False, "error": "no code was generated"}
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        error = f"SyntaxError at line {exc.lineno}: {exc.msg}"
        return report | {"parses": False, "compiles": False, "valid": False, "error": error}
    try:
        compile(code, "<generated>", "exec")
    except (SyntaxError, ValueError) as exc:
        return report | {"parses": True, "compiles": False, "valid": False, "error": f"{type(exc).__name__}: {exc}"}
    defined = [
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    return report | {
        "parses": True,
        "compiles": True,
        "valid": True,
        "error": None,
        "defines": defined,
        "lines": len(code.splitlines()),
        "note": "parses and compiles; it was not run, so whether it does what was asked is not checked",
    }


def sentences(text: str) -> list[str]:
    """Split prose into sentences (good enough for extractive answers); blank lines split too."""
    found: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        for part in _SENTENCE_END.split(" ".join(block.split())):
            if part.strip():
                found.append(part.strip())
    return found


class Timer:
    """Named phases of a task, in seconds: ``with timer.phase("embed"): ...``; :meth:`as_dict` for the result."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        out = {f"{name}_s": round(value, 4) for name, value in self.phases.items()}
        out["total_s"] = round(time.perf_counter() - self._start, 4)
        return out
