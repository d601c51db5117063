"""Cline: documentation and code generation, and validation of what it generated."""

from __future__ import annotations

from xnai_tasks.tasks import register_diagnostics

ROLE = "cline"

register_diagnostics(ROLE)
