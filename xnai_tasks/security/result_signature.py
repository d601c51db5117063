"""The Ed25519 signature of a task result: over the task id, its status and the result's canonical JSON.

The worker's result backend stores :func:`sign_result`'s dict with the result
(:mod:`xnai_tasks.security.results`); a reader calls :func:`verify_result`, which raises only
:class:`~xnai_tasks.errors.ResultSignatureError`.
"""

from __future__ import annotations

import time
from typing import Any, Final

from xnai_tasks.errors import MessageRejected, ResultSignatureError, UsageError
from xnai_tasks.security.canonical import canonical_document, digest
from xnai_tasks.security.key_pair import Signer
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.refusal import Reason, show
from xnai_tasks.security.signature import (
    SIG_VERSION,
    encode_signature,
    malformed,
    parse_fields,
    signature_matches,
    usable_key,
)

#: Fields of the signature dict of a result.
RESULT_SIG_FIELDS: Final = ("v", "agent", "kid", "ts", "sig")

_RESULT_DOMAIN: Final = b"xnai-result-v1\n"


def _result_bytes(*, agent: str, kid: str, ts: float, task_id: str, status: str, result_digest: str) -> bytes:
    doc = {
        "v": SIG_VERSION,
        "agent": agent,
        "key_id": kid,
        "ts": ts,
        "task_id": task_id,
        "status": status,
        "result_digest": result_digest,
    }
    return _RESULT_DOMAIN + canonical_document(doc)


def sign_result(
    signer: Signer, *, task_id: str, status: str, result: Any, now: float | None = None
) -> dict[str, str | float | int]:
    """Signature dict over a task's id, status and result. UsageError if the result is not JSON."""
    if not isinstance(task_id, str) or not isinstance(status, str):
        raise UsageError("cannot sign a result: task id and status must be strings")
    try:
        result_digest = digest(result)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UsageError(f"cannot sign the result of task {task_id}: not JSON: {exc}") from None
    ts = time.time() if now is None else float(now)
    data = _result_bytes(
        agent=signer.agent, kid=signer.kid, ts=ts, task_id=task_id, status=status, result_digest=result_digest
    )
    return {
        "v": SIG_VERSION,
        "agent": signer.agent,
        "kid": signer.kid,
        "ts": ts,
        "sig": encode_signature(signer, data),
    }


def _verify_result(
    keyring: Keyring, task_id: Any, status: Any, result: Any, signature: Any, agent: str | None, now: float
) -> None:
    if signature is None:
        raise MessageRejected(Reason.UNSIGNED, "it is not signed")
    fields = parse_fields(signature, "signature")
    if not isinstance(task_id, str) or not isinstance(status, str):
        raise malformed("task id or status is not a string")
    entry, _ = usable_key(keyring, fields.kid, now)
    if entry.agent != fields.agent or (agent is not None and entry.agent != agent):
        raise MessageRejected(Reason.BAD_SIGNATURE, f"signed by {entry.agent}, expected {agent or show(fields.agent)}")
    try:
        result_digest = digest(result)
    except (TypeError, ValueError, RecursionError):
        raise malformed("result is not canonical JSON") from None
    data = _result_bytes(
        agent=fields.agent, kid=fields.kid, ts=fields.ts, task_id=task_id, status=status, result_digest=result_digest
    )
    if not signature_matches(entry, data, fields.raw):
        raise MessageRejected(Reason.BAD_SIGNATURE, f"signature by {fields.kid} does not match")


def verify_result(
    keyring: Keyring,
    *,
    task_id: Any,
    status: Any,
    result: Any,
    signature: Any,
    agent: str | None = None,
    now: float | None = None,
) -> None:
    """Check a result's signature (and signer, if ``agent`` is given). Raises only ResultSignatureError,
    whose cause is the :class:`MessageRejected` saying why (its ``reason``)."""
    at = time.time() if now is None else now
    try:
        _verify_result(keyring, task_id, status, result, signature, agent, at)
    except MessageRejected as rejected:
        raise ResultSignatureError(f"result of task {show(task_id)} is not authentic: {rejected.detail}") from rejected
    except Exception as exc:
        problem = f"unexpected {type(exc).__name__} while verifying"
        raise ResultSignatureError(f"result of task {show(task_id)} is not authentic: {problem}") from None
