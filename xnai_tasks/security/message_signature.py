"""The Ed25519 signature of a Celery task message (README, Security).

A message signature covers the routing-relevant headers (:data:`COVERED_HEADERS`), the queue, a
SHA-256 digest of the body, a timestamp, a nonce, the key id and the agent name, so a signed body cannot
be re-routed to another task, id or queue. The producer puts :func:`sign_message`'s dict into the
``xnai_sig`` header; the worker calls :func:`verify_message` before anything runs. The verifier raises
only :class:`MessageRejected`, whose ``reason`` is one of :data:`~.refusal.REASONS`, whatever it is given.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected, UsageError
from xnai_tasks.security.canonical import canonical_document, canonical_json, digest, sorted_json
from xnai_tasks.security.key_pair import KeyEntry, Signer
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.refusal import Reason, show
from xnai_tasks.security.signature import (
    MAX_NAME,
    MAX_SKEW_S,
    SIG_HEADER,
    SIG_VERSION,
    SignatureFields,
    check_age,
    encode_signature,
    malformed,
    parse_fields,
    parse_nonce,
    signature_matches,
    signer_key,
)

#: Celery protocol-2 headers covered by the signature. A missing header signs as null.
COVERED_HEADERS: Final = ("task", "id", "eta", "expires", "retries", "parent_id", "root_id", "group")
#: Fields of the signature dict of a message.
SIG_FIELDS: Final = ("v", "agent", "kid", "ts", "nonce", "queue", "sig")

_TASK_DOMAIN: Final = b"xnai-task-v1\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    """What a valid message proved: who signed it, for which task, queue and time."""

    agent: str
    kid: str
    task: str
    task_id: str
    role: str
    queue: str
    ts: float
    nonce: str
    key_status: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sig:
    """A message's signature dict, parsed."""

    fields: SignatureFields
    nonce: str
    queue: str


def _covered(headers: Mapping[str, Any]) -> dict[str, Any]:
    covered = {name: headers.get(name) for name in COVERED_HEADERS}
    for name, value in covered.items():
        if value is not None and not isinstance(value, str | int | float):
            raise malformed(f"header {name} is a {type(value).__name__}, not a string or number")
    for name in ("task", "id"):
        value = covered[name]
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
            raise malformed(f"header {name} is missing or not a short string")
    return covered


def _message_bytes(
    *, agent: str, kid: str, ts: float, nonce: str, queue: str, covered: dict[str, Any], body_digest: str
) -> bytes:
    doc = {
        "v": SIG_VERSION,
        "agent": agent,
        "key_id": kid,
        "ts": ts,
        "nonce": nonce,
        "queue": queue,
        "headers": covered,
        "body_digest": body_digest,
    }
    return _TASK_DOMAIN + canonical_document(doc)


def sign_message(
    signer: Signer, *, headers: Mapping[str, Any], body: Any, queue: str, now: float | None = None
) -> dict[str, str | float | int]:
    """The ``xnai_sig`` header of a protocol-2 message. UsageError if headers or body cannot be signed."""
    try:
        covered = _covered(headers)
    except MessageRejected as exc:
        raise UsageError(f"cannot sign task message: {exc.detail}") from None
    if not isinstance(queue, str) or not 0 < len(queue) <= MAX_NAME:
        raise UsageError(f"cannot sign task message: bad queue {show(queue)}")
    ts = time.time() if now is None else float(now)
    nonce = secrets.token_hex(16)
    try:
        data = _message_bytes(
            agent=signer.agent,
            kid=signer.kid,
            ts=ts,
            nonce=nonce,
            queue=queue,
            covered=covered,
            body_digest=digest(body),
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise UsageError(f"cannot sign task {covered['task']}: arguments or headers are not JSON: {exc}") from None
    return {
        "v": SIG_VERSION,
        "agent": signer.agent,
        "kid": signer.kid,
        "ts": ts,
        "nonce": nonce,
        "queue": queue,
        "sig": encode_signature(signer, data),
    }


def _parse_sig(raw: Any) -> _Sig:
    if raw is None:
        raise MessageRejected(Reason.UNSIGNED, f"no {SIG_HEADER} header")
    fields = parse_fields(raw, SIG_HEADER)
    nonce = parse_nonce(raw)
    queue = raw.get("queue")
    if not isinstance(queue, str) or not 0 < len(queue) <= MAX_NAME:
        raise malformed(f"{SIG_HEADER} field queue is missing or invalid")
    return _Sig(fields=fields, nonce=nonce, queue=queue)


def _check_route(sig: _Sig, task: str, queue: str, role: str) -> None:
    if sig.queue != queue:
        raise MessageRejected(Reason.WRONG_QUEUE, f"signed for queue {show(sig.queue)}, delivered on {show(queue)}")
    short = c.split_task_name(task)[1]
    if not short or c.role_of_task(task) != role or queue != c.queue_for(role):
        raise MessageRejected(
            Reason.WRONG_QUEUE, f"task {show(task)} does not belong on queue {show(queue)} of role {role}"
        )


def _signed_bytes(sig: _Sig, covered: dict[str, Any], body_json: bytes) -> bytes:
    return _message_bytes(
        agent=sig.fields.agent,
        kid=sig.fields.kid,
        ts=sig.fields.ts,
        nonce=sig.nonce,
        queue=sig.queue,
        covered=covered,
        body_digest=hashlib.sha256(body_json).hexdigest(),
    )


def _signature_matches(entry: KeyEntry, sig: _Sig, covered: dict[str, Any], body: Any) -> bool:
    """Verify against the body's canonical JSON.

    Fast path: one sorted encoding (:func:`sorted_json`), which equals :func:`canonical_json` whenever
    every dict key is a string, as in any decoded message. Only if that fails is the exact (round-trip)
    form computed and, if it differs, tried too. Raises TypeError/ValueError/RecursionError on a body that
    is not JSON.
    """
    try:
        fast: bytes | None = sorted_json(body)
    except TypeError:
        fast = None  # mixed-type dict keys cannot be sorted; the exact form handles them
    if fast is not None and signature_matches(entry, _signed_bytes(sig, covered, fast), sig.fields.raw):
        return True
    exact = canonical_json(body)
    return exact != fast and signature_matches(entry, _signed_bytes(sig, covered, exact), sig.fields.raw)


def _verify_message(
    keyring: Keyring, headers: Any, body: Any, queue: Any, now: float, max_age_s: float, role: str
) -> Verified:
    if not isinstance(headers, Mapping):
        raise malformed(f"headers are a {type(headers).__name__}, not an object")
    sig = _parse_sig(headers.get(SIG_HEADER))
    covered = _covered(headers)
    if not isinstance(queue, str) or not queue:
        raise malformed(f"delivery queue {show(queue)} is not a name")
    entry, status = signer_key(keyring, sig.fields.kid, sig.fields.agent, now)
    try:
        authentic = _signature_matches(entry, sig, covered, body)
    except (TypeError, ValueError, RecursionError):
        raise malformed("body or headers are not canonical JSON") from None
    if not authentic:
        raise MessageRejected(Reason.BAD_SIGNATURE, f"signature by {sig.fields.kid} does not match")
    task: str = covered["task"]
    _check_route(sig, task, queue, role)
    if not keyring.is_authorized(entry.agent, task, role):
        raise MessageRejected(Reason.NOT_AUTHORIZED, f"{entry.agent} may not dispatch {show(task)} to {role}")
    check_age(sig.fields.ts, now, max_age_s)
    return Verified(
        agent=entry.agent,
        kid=entry.kid,
        task=task,
        task_id=covered["id"],
        role=role,
        queue=queue,
        ts=float(sig.fields.ts),
        nonce=sig.nonce,
        key_status=str(status),
    )


def verify_message(
    keyring: Keyring,
    *,
    headers: Any,
    body: Any,
    queue: Any,
    now: float,
    max_age_s: float,
    role: str,
) -> Verified:
    """Check a delivered message's signature, route, authorization and age, before it runs.

    ``headers`` are the message headers (with ``xnai_sig``), ``body`` the decoded body, ``queue`` the
    routing key it was delivered on and ``role`` the consuming worker's role. Replay is the caller's
    check: remember ``constants.nonce_key(role, nonce)`` for :func:`nonce_ttl_s` seconds. Raises only MessageRejected.
    """
    try:
        return _verify_message(keyring, headers, body, queue, now, max_age_s, role)
    except MessageRejected:
        raise
    except Exception as exc:
        raise malformed(f"unexpected {type(exc).__name__} while verifying") from None


def nonce_ttl_s(max_age_s: float) -> int:
    """Seconds to keep ``constants.nonce_key``: a message is accepted from ``ts - MAX_SKEW_S`` to ``ts + max_age_s``."""
    return math.ceil(max_age_s + MAX_SKEW_S) + 1
