"""The Ed25519 signatures of Celery's remote-control commands and of the workers' replies to them.

A command's signature covers its whole body (method, arguments, destination, reply address), a
timestamp and a nonce; a reply's covers its ticket and body. Each is signed in its own domain, so
neither can pass for the other or for a task message. Who may send what is
:mod:`xnai_tasks.security.control`'s check. The verifiers raise only :class:`MessageRejected`.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from xnai_tasks.errors import MessageRejected, UsageError
from xnai_tasks.security.canonical import canonical_document, digest
from xnai_tasks.security.key_pair import Signer
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.refusal import Reason
from xnai_tasks.security.signature import (
    SIG_HEADER,
    SIG_VERSION,
    check_age,
    encode_signature,
    malformed,
    parse_fields,
    parse_nonce,
    signature_matches,
    signer_key,
)

_CONTROL_DOMAIN: Final = b"xnai-control-v1\n"
_REPLY_DOMAIN: Final = b"xnai-control-reply-v1\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedControl:
    """Who signed a control message or reply, and its nonce and time."""

    agent: str
    kid: str
    ts: float
    nonce: str


def _control_bytes(domain: bytes, *, agent: str, kid: str, ts: float, nonce: str, body_digest: str) -> bytes:
    doc = {"v": SIG_VERSION, "agent": agent, "key_id": kid, "ts": ts, "nonce": nonce, "body_digest": body_digest}
    return domain + canonical_document(doc)


def _sign(domain: bytes, signer: Signer, body: Any, now: float | None) -> dict[str, str | float | int]:
    ts = time.time() if now is None else float(now)
    nonce = secrets.token_hex(16)
    try:
        body_digest = digest(body)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UsageError(f"cannot sign a control message: not JSON: {exc}") from None
    data = _control_bytes(domain, agent=signer.agent, kid=signer.kid, ts=ts, nonce=nonce, body_digest=body_digest)
    return {
        "v": SIG_VERSION,
        "agent": signer.agent,
        "kid": signer.kid,
        "ts": ts,
        "nonce": nonce,
        "sig": encode_signature(signer, data),
    }


def sign_control(signer: Signer, *, body: Any, now: float | None = None) -> dict[str, str | float | int]:
    """The ``xnai_sig`` header of a remote-control message: its whole body (method, arguments, destination,
    reply address), a timestamp and a nonce."""
    return _sign(_CONTROL_DOMAIN, signer, body, now)


def sign_reply(signer: Signer, *, ticket: str, body: Any, now: float | None = None) -> dict[str, str | float | int]:
    """The ``xnai_sig`` header of a worker's reply to a control message (the ticket is signed with the body)."""
    return _sign(_REPLY_DOMAIN, signer, {"ticket": ticket, "reply": body}, now)


def _verify(domain: bytes, keyring: Keyring, body: Any, signature: Any, now: float) -> VerifiedControl:
    if signature is None:
        raise MessageRejected(Reason.UNSIGNED, f"no {SIG_HEADER} header")
    fields = parse_fields(signature, SIG_HEADER)
    nonce = parse_nonce(signature)
    entry, _ = signer_key(keyring, fields.kid, fields.agent, now)
    try:
        body_digest = digest(body)
    except (TypeError, ValueError, RecursionError):
        raise malformed("body is not canonical JSON") from None
    data = _control_bytes(
        domain, agent=fields.agent, kid=fields.kid, ts=fields.ts, nonce=nonce, body_digest=body_digest
    )
    if not signature_matches(entry, data, fields.raw):
        raise MessageRejected(Reason.BAD_SIGNATURE, f"signature by {fields.kid} does not match")
    return VerifiedControl(agent=entry.agent, kid=fields.kid, ts=float(fields.ts), nonce=nonce)


def _verify_or_refuse(domain: bytes, keyring: Keyring, body: Any, signature: Any, now: float) -> VerifiedControl:
    """:func:`_verify`, with any unexpected error turned into a ``malformed`` refusal."""
    try:
        return _verify(domain, keyring, body, signature, now)
    except MessageRejected:
        raise
    except Exception as exc:
        raise malformed(f"unexpected {type(exc).__name__} while verifying") from None


def verify_control(keyring: Keyring, *, body: Any, signature: Any, now: float, max_age_s: float) -> VerifiedControl:
    """Check a control message's signature and age (who may send what is the caller's check).

    Raises only :class:`MessageRejected`.
    """
    verified = _verify_or_refuse(_CONTROL_DOMAIN, keyring, body, signature, now)
    check_age(verified.ts, now, max_age_s)
    return verified


def verify_reply(keyring: Keyring, *, ticket: Any, body: Any, signature: Any, now: float) -> VerifiedControl:
    """Check a control reply's signature over its ticket and body. Raises only :class:`MessageRejected`."""
    return _verify_or_refuse(_REPLY_DOMAIN, keyring, {"ticket": ticket, "reply": body}, signature, now)
