"""Curation: chunking, batched embedding, indexing into the memory bank and semantic search."""

from __future__ import annotations

from xnai_tasks.tasks import register_diagnostics

ROLE = "curation"

register_diagnostics(ROLE)
