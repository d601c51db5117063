"""Provenance of what a workflow puts in the memory bank, and its check when a search finds it.

A chunk the copilot indexes carries the run, step, role, model and task id that produced its text, and the
producing worker's result as stored with its Ed25519 signature (security/result_signature.py). A reader
verifies it on its own side: the signature must be the role's over that task's result, and the chunk's text
must be part of the signed text; a chunk altered in Redis, or a provenance altered, is not verified.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from xnai_tasks.errors import ResultSignatureError
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.result_signature import verify_result
from xnai_tasks.security.signature import SIG_HEADER

#: The field of a producing result whose text is indexed.
TEXT_FIELD = "text"


def provenance_of(
    *, workflow: str, run_id: str, step: str, role: str, task: str, task_id: str, stored: Mapping[str, Any]
) -> dict[str, Any]:
    """The provenance of a step's result, from the result as its worker stored it (status, result, signature)."""
    result = stored.get("result")
    model = result.get("model") if isinstance(result, Mapping) else None
    return {
        "workflow": workflow,
        "run_id": run_id,
        "step": step,
        "role": role,
        "task": task,
        "model": model,
        "task_id": task_id,
        "status": stored.get("status"),
        "signature": stored.get(SIG_HEADER),
        "field": TEXT_FIELD,
        "result": result,
    }


def summary(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance without the signed result itself: what a person reads."""
    signature = provenance.get("signature")
    kid = signature.get("kid") if isinstance(signature, Mapping) else None
    keep = ("workflow", "run_id", "step", "role", "task", "model", "task_id")
    return {key: provenance.get(key) for key in keep} | {"signed_by": kid}


def verify_chunk(keyring: Keyring, chunk: str, provenance: Any) -> dict[str, Any]:
    """Is ``chunk`` part of a result its role signed? ``{"verified", "reason", ...summary}``."""
    if isinstance(provenance, str):
        try:
            provenance = json.loads(provenance)
        except ValueError:
            return {"verified": False, "reason": "provenance is not JSON"}
    if not isinstance(provenance, Mapping):
        return {"verified": False, "reason": "no provenance"}
    about = summary(provenance)
    try:
        verify_result(
            keyring,
            task_id=provenance.get("task_id"),
            status=provenance.get("status"),
            result=provenance.get("result"),
            signature=provenance.get("signature"),
            agent=str(provenance.get("role")),
        )
    except ResultSignatureError as exc:
        return about | {"verified": False, "reason": str(exc)}
    result = provenance.get("result")
    text = result.get(str(provenance.get("field"))) if isinstance(result, Mapping) else None
    if not isinstance(text, str) or chunk not in text:
        return about | {"verified": False, "reason": "the chunk is not in the signed result: it was altered"}
    return about | {"verified": True, "reason": f"signed by {provenance.get('role')} and unaltered"}


def verified_hits(keyring: Keyring, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A search's hits, each with ``provenance`` replaced by its verdict (``{"verified": False}`` if none)."""
    return [
        hit | {"provenance": verify_chunk(keyring, str(hit.get("chunk", "")), hit.get("provenance"))} for hit in hits
    ]
