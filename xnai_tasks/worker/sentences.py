"""Prose split into sentences (for extractive answers)."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentences(text: str) -> list[str]:
    """Split prose into sentences (good enough for extractive answers); blank lines split too."""
    found: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        for part in _SENTENCE_END.split(" ".join(block.split())):
            if part.strip():
                found.append(part.strip())
    return found
