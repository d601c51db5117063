"""Grok: long-form analysis, trade-off evaluation and recommendation synthesis."""

from __future__ import annotations

from xnai_tasks.tasks import register_diagnostics

ROLE = "grok"

register_diagnostics(ROLE)
