"""A cached answer: its key, its signed body, and the checks a reader makes before serving it.

The **key** is the sha256 of the canonical JSON of the role, the task, the keyword arguments (sampling
parameters included) and the role's models as ``kind:sha256``: a new model is a new key, and an entry also
names its models, checked again when it is read. The **body** holds the key, the answer, the task that
produced it and, for a semantic entry, the request's text and vector. The role that produced it signs the
body (domain ``xnai-cache-v1``, with its own Ed25519 key); a reader verifies the signature, the signer (the
role the key belongs to), the key and the models, and serves nothing else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from xnai_tasks.errors import MessageRejected
from xnai_tasks.security.canonical import canonical_document, canonical_json, digest
from xnai_tasks.security.key_pair import Signer
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.refusal import Reason
from xnai_tasks.security.signature import (
    SIG_VERSION,
    encode_signature,
    malformed,
    parse_fields,
    signature_matches,
    usable_key,
)

_DOMAIN: Final = b"xnai-cache-v1\n"
#: The body fields every entry has (a semantic entry adds ``text``, ``scope`` and ``vector``).
BODY_FIELDS: Final = ("key", "role", "task", "models", "result", "source_task", "created")


def cache_key(role: str, task: str, kwargs: Mapping[str, Any], models: Sequence[str]) -> str:
    """The cache key of ``role.task(**kwargs)`` answered with ``models`` (``kind:sha256``, sorted)."""
    request = json.loads(canonical_json(dict(kwargs)))
    return digest({"role": role, "task": task, "kwargs": request, "models": sorted(models)})


def model_ids(verdicts: Mapping[Any, Any]) -> list[str]:
    """The role's models as ``kind:sha256`` from its published model hash (worker/startup.py); empty when a
    model has no checksum (nothing is cached then: the answer could not be tied to the model)."""
    found = []
    for raw in verdicts.values():
        try:
            doc = json.loads(raw)
        except (TypeError, ValueError):
            return []
        sha = doc.get("sha256") if isinstance(doc, dict) else None
        if not isinstance(sha, str) or not sha:
            return []
        found.append(f"{doc.get('kind')}:{sha}")
    return sorted(found)


def _signed_bytes(agent: str, kid: str, ts: float, body: Mapping[str, Any]) -> bytes:
    doc = {"v": SIG_VERSION, "agent": agent, "key_id": kid, "ts": ts, "body_digest": digest(dict(body))}
    return _DOMAIN + canonical_document(doc)


def sign_entry(signer: Signer, body: Mapping[str, Any]) -> str:
    """The stored entry: ``body`` and its signature by ``signer``, as JSON text."""
    ts = time.time()
    sig = {
        "v": SIG_VERSION,
        "agent": signer.agent,
        "kid": signer.kid,
        "ts": ts,
        "sig": encode_signature(signer, _signed_bytes(signer.agent, signer.kid, ts, body)),
    }
    return json.dumps({"body": body, "sig": sig}, separators=(",", ":"), allow_nan=False)


def verify_entry(keyring: Keyring, raw: Any, *, key: str, role: str, models: Sequence[str]) -> dict[str, Any]:
    """The body of the entry ``raw`` read under ``key``, if ``role`` signed it for these ``models``.

    Raises :class:`MessageRejected` (malformed, unknown or revoked key, bad signature, not authorized)
    otherwise: such an entry is never served.
    """
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError):
        raise malformed("the cache entry is not JSON") from None
    body = doc.get("body") if isinstance(doc, dict) else None
    if not isinstance(body, dict) or any(name not in body for name in BODY_FIELDS):
        raise malformed("the cache entry has no body")
    fields = parse_fields(doc.get("sig"), "cache signature")
    entry, _ = usable_key(keyring, fields.kid, time.time())
    if entry.agent != fields.agent or entry.agent != role:
        raise MessageRejected(Reason.NOT_AUTHORIZED, f"cache entry signed by {entry.agent}, not {role}")
    if not signature_matches(entry, _signed_bytes(fields.agent, fields.kid, fields.ts, body), fields.raw):
        raise MessageRejected(Reason.BAD_SIGNATURE, f"cache entry signature by {fields.kid} does not match")
    if body["key"] != key or body["role"] != role or body["models"] != sorted(models):
        raise MessageRejected(Reason.MALFORMED, "cache entry is for another request or model")
    return body


def hit_result(body: Mapping[str, Any], kind: str, score: float) -> dict[str, Any]:
    """The cached answer as served: the stored result with ``cache`` saying it is one."""
    result = dict(body["result"])
    result["cache"] = {"kind": kind, "score": round(score, 4), "source_task": body["source_task"]}
    return result
