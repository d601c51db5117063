"""Copilot: the coordinator. Beat schedules, health checks, orchestration of the other roles."""

from __future__ import annotations

from xnai_tasks.tasks import register_diagnostics

ROLE = "copilot"

register_diagnostics(ROLE)
