"""Code in a model's answer: the fenced block, and whether it parses and compiles (Python)."""

from __future__ import annotations

import ast
import re
from typing import Any

#: Languages whose code is checked by parsing and compiling it.
VALIDATED_LANGUAGES = ("python",)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


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
