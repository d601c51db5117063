"""Ed25519 signatures over Celery task messages and task results (DESIGN.md 6).

A message signature covers the routing-relevant headers (:data:`COVERED_HEADERS`), the queue, a
SHA-256 digest of the body, a timestamp, a nonce, the key id and the agent name, so a signed body cannot
be re-routed to another task, id or queue. The producer puts :func:`sign_message`'s dict into the
``xnai_sig`` header; the worker calls :func:`verify_message` before anything runs. The verifier raises
only :class:`MessageRejected`, whose ``reason`` is one of :data:`REASONS`, whatever it is given.

Bodies and results are digested in a canonical JSON form of what they become after a JSON round trip
(tuples become lists, keys become strings; kombu's tagged types such as datetime are tagged the same
way kombu tags them), so the producer's Python objects and the worker's decoded ones digest alike.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import hashlib
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from nacl.exceptions import BadSignatureError

from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected, ResultSignatureError, UsageError
from xnai_tasks.security.keys import KeyEntry, Keyring, KeyStatus, Signer

#: Message header carrying the signature dict.
SIG_HEADER: Final = "xnai_sig"
#: Version of the signed layout; bumped on any change to what is signed.
SIG_VERSION: Final = 1
#: Celery protocol-2 headers covered by the signature. A missing header signs as null.
COVERED_HEADERS: Final = ("task", "id", "eta", "expires", "retries", "parent_id", "root_id", "group")
#: Fields of the signature dict of a message, and of a result.
SIG_FIELDS: Final = ("v", "agent", "kid", "ts", "nonce", "queue", "sig")
RESULT_SIG_FIELDS: Final = ("v", "agent", "kid", "ts", "sig")
#: A timestamp this far ahead of the verifier's clock is refused as ``future``.
MAX_SKEW_S: Final = 60.0

_TASK_DOMAIN: Final = b"xnai-task-v1\n"
_RESULT_DOMAIN: Final = b"xnai-result-v1\n"
_MAX_NAME: Final = 255
_MAX_TS: Final = 1e12
_SIG_B64_LEN: Final = 88
_HEX16: Final = re.compile(r"[0-9a-f]{16}")
_HEX32: Final = re.compile(r"[0-9a-f]{32}")
_AGENT: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class Reason(StrEnum):
    """Why a message was refused; the values are the counter names."""

    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    BAD_SIGNATURE = "bad_signature"
    NOT_AUTHORIZED = "not_authorized"
    WRONG_QUEUE = "wrong_queue"
    EXPIRED = "expired"
    FUTURE = "future"
    REPLAY = "replay"


#: Every reason code, for counters and dashboards.
REASONS: Final = tuple(r.value for r in Reason)


@dataclass(frozen=True, slots=True)
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


# ---- canonical JSON ----


def _tagged(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "__value__": value}


def _json_default(obj: Any) -> Any:
    """Encode the types kombu's JSON serializer tags, in kombu's tagged form."""
    if isinstance(obj, dt.datetime):
        return _tagged("datetime", obj.isoformat())
    if isinstance(obj, dt.date):
        return _tagged("date", obj.isoformat())
    if isinstance(obj, dt.time):
        return _tagged("time", obj.isoformat())
    if isinstance(obj, decimal.Decimal):
        return _tagged("decimal", str(obj))
    if isinstance(obj, uuid.UUID):
        return _tagged("uuid", {"hex": obj.hex})
    if isinstance(obj, bytes):
        try:
            return _tagged("bytes", obj.decode("utf-8"))
        except UnicodeDecodeError:
            return _tagged("base64", base64.b64encode(obj).decode("ascii"))
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_ROUND_TRIP: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default)
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


#: One sorted pass with the kombu tags: equals canonical_json() when every dict key is a string.
_SORTED: Final = json.JSONEncoder(
    sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=_json_default
)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes of ``value`` as it is after a JSON round trip. Raises ValueError/TypeError."""
    return _CANONICAL.encode(json.loads(_ROUND_TRIP.encode(value))).encode("ascii")


def digest(value: Any) -> str:
    """SHA-256 hex of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


# ---- messages ----


def _show(value: Any) -> str:
    """A short, one-line, escaped rendering of untrusted input for error details."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _malformed(detail: str) -> MessageRejected:
    return MessageRejected(Reason.MALFORMED, detail)


def _covered(headers: Mapping[str, Any]) -> dict[str, Any]:
    covered = {name: headers.get(name) for name in COVERED_HEADERS}
    for name, value in covered.items():
        if value is not None and not isinstance(value, str | int | float):
            raise _malformed(f"header {name} is a {type(value).__name__}, not a string or number")
    for name in ("task", "id"):
        value = covered[name]
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
            raise _malformed(f"header {name} is missing or not a short string")
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
    return _TASK_DOMAIN + _CANONICAL.encode(doc).encode("ascii")


def sign_message(
    signer: Signer, *, headers: Mapping[str, Any], body: Any, queue: str, now: float | None = None
) -> dict[str, str | float | int]:
    """The ``xnai_sig`` header of a protocol-2 message. UsageError if headers or body cannot be signed."""
    try:
        covered = _covered(headers)
    except MessageRejected as exc:
        raise UsageError(f"cannot sign task message: {exc.detail}") from None
    if not isinstance(queue, str) or not 0 < len(queue) <= _MAX_NAME:
        raise UsageError(f"cannot sign task message: bad queue {_show(queue)}")
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
        "sig": base64.b64encode(signer.sign(data)).decode("ascii"),
    }


@dataclass(frozen=True, slots=True)
class _Sig:
    agent: str
    kid: str
    ts: float
    nonce: str
    queue: str
    raw: bytes


def _signature_bytes(value: Any) -> bytes | None:
    if not isinstance(value, str) or len(value) != _SIG_B64_LEN:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Only the one canonical encoding is accepted, so the header has a single valid spelling.
    if len(raw) != 64 or base64.b64encode(raw) != value.encode("ascii"):
        return None
    return raw


def _common_fields(raw: Any) -> tuple[str, str, float, bytes] | str:
    """Agent, kid, ts and signature of a signature dict, or the name of the first bad field."""
    if not isinstance(raw, Mapping):
        return "signature"
    if raw.get("v") != SIG_VERSION or type(raw.get("v")) is not int:
        return "v"
    agent, kid, ts = raw.get("agent"), raw.get("kid"), raw.get("ts")
    if not isinstance(agent, str) or not _AGENT.fullmatch(agent):
        return "agent"
    if not isinstance(kid, str) or not _HEX16.fullmatch(kid):
        return "kid"
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not -_MAX_TS <= ts <= _MAX_TS:
        return "ts"  # the range check also refuses NaN, infinities and ints too large for a float
    signature = _signature_bytes(raw.get("sig"))
    if signature is None:
        return "sig"
    return agent, kid, ts, signature


def _parse_sig(raw: Any) -> _Sig:
    if raw is None:
        raise MessageRejected(Reason.UNSIGNED, f"no {SIG_HEADER} header")
    common = _common_fields(raw)
    if isinstance(common, str):
        raise _malformed(f"{SIG_HEADER} field {common} is missing or invalid")
    nonce, queue = raw.get("nonce"), raw.get("queue")
    if not isinstance(nonce, str) or not _HEX32.fullmatch(nonce):
        raise _malformed(f"{SIG_HEADER} field nonce is missing or invalid")
    if not isinstance(queue, str) or not 0 < len(queue) <= _MAX_NAME:
        raise _malformed(f"{SIG_HEADER} field queue is missing or invalid")
    agent, kid, ts, signature = common
    return _Sig(agent=agent, kid=kid, ts=ts, nonce=nonce, queue=queue, raw=signature)


def _usable_key(keyring: Keyring, kid: str, agent: str, now: float) -> tuple[KeyEntry, KeyStatus]:
    entry = keyring.entry(kid)
    if entry is None:
        raise MessageRejected(Reason.UNKNOWN_KEY, f"key {kid} is not in the keyring")
    status = entry.status(now)
    if status is KeyStatus.REVOKED or status is KeyStatus.EXPIRED:
        raise MessageRejected(Reason.REVOKED_KEY, f"key {kid} of {entry.agent} is {status}")
    if entry.agent != agent:
        raise MessageRejected(Reason.BAD_SIGNATURE, f"key {kid} belongs to {entry.agent}, not {_show(agent)}")
    return entry, status


def _check_route(sig: _Sig, task: str, queue: str, role: str) -> None:
    if sig.queue != queue:
        raise MessageRejected(Reason.WRONG_QUEUE, f"signed for queue {_show(sig.queue)}, delivered on {_show(queue)}")
    short = task.partition(".")[2]
    if not short or c.role_of_task(task) != role or queue != c.queue_for(role):
        raise MessageRejected(
            Reason.WRONG_QUEUE, f"task {_show(task)} does not belong on queue {_show(queue)} of role {role}"
        )


def _signature_matches(entry: KeyEntry, sig: _Sig, covered: dict[str, Any], body: Any) -> bool:
    """Verify against the body's canonical JSON.

    Fast path: one sorted encoding, which equals :func:`canonical_json` whenever every dict key is a
    string, as in any decoded message. Only if that fails is the exact (round-trip) form computed and,
    if it differs, tried too. Raises TypeError/ValueError/RecursionError on a body that is not JSON.
    """
    try:
        fast: bytes | None = _SORTED.encode(body).encode("ascii")
    except TypeError:
        fast = None  # mixed-type dict keys cannot be sorted; the exact form handles them
    if fast is not None and _signature_ok(entry, sig, covered, fast):
        return True
    exact = canonical_json(body)
    return exact != fast and _signature_ok(entry, sig, covered, exact)


def _signature_ok(entry: KeyEntry, sig: _Sig, covered: dict[str, Any], body_json: bytes) -> bool:
    data = _message_bytes(
        agent=sig.agent,
        kid=sig.kid,
        ts=sig.ts,
        nonce=sig.nonce,
        queue=sig.queue,
        covered=covered,
        body_digest=hashlib.sha256(body_json).hexdigest(),
    )
    try:
        entry.verify_key.verify(data, sig.raw)
    except BadSignatureError:
        return False
    return True


def _verify_message(
    keyring: Keyring, headers: Any, body: Any, queue: Any, now: float, max_age_s: float, role: str
) -> Verified:
    if not isinstance(headers, Mapping):
        raise _malformed(f"headers are a {type(headers).__name__}, not an object")
    sig = _parse_sig(headers.get(SIG_HEADER))
    covered = _covered(headers)
    if not isinstance(queue, str) or not queue:
        raise _malformed(f"delivery queue {_show(queue)} is not a name")
    entry, status = _usable_key(keyring, sig.kid, sig.agent, now)
    try:
        authentic = _signature_matches(entry, sig, covered, body)
    except (TypeError, ValueError, RecursionError):
        raise _malformed("body or headers are not canonical JSON") from None
    if not authentic:
        raise MessageRejected(Reason.BAD_SIGNATURE, f"signature by {sig.kid} does not match")
    task: str = covered["task"]
    _check_route(sig, task, queue, role)
    if not keyring.is_authorized(entry.agent, task, role):
        raise MessageRejected(Reason.NOT_AUTHORIZED, f"{entry.agent} may not dispatch {_show(task)} to {role}")
    if now - sig.ts > max_age_s:
        raise MessageRejected(Reason.EXPIRED, f"signed {now - sig.ts:.0f} s ago, more than {max_age_s:g} s")
    if sig.ts - now > MAX_SKEW_S:
        raise MessageRejected(Reason.FUTURE, f"signed {sig.ts - now:.0f} s in the future")
    return Verified(
        agent=entry.agent,
        kid=entry.kid,
        task=task,
        task_id=covered["id"],
        role=role,
        queue=queue,
        ts=float(sig.ts),
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
        raise _malformed(f"unexpected {type(exc).__name__} while verifying") from None


def nonce_ttl_s(max_age_s: float) -> int:
    """Seconds to keep ``constants.nonce_key``: a message is accepted from ``ts - MAX_SKEW_S`` to ``ts + max_age_s``."""
    return math.ceil(max_age_s + MAX_SKEW_S) + 1


# ---- results ----


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
    return _RESULT_DOMAIN + _CANONICAL.encode(doc).encode("ascii")


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
        "sig": base64.b64encode(signer.sign(data)).decode("ascii"),
    }


def _verify_result(
    keyring: Keyring, task_id: Any, status: Any, result: Any, signature: Any, agent: str | None, now: float
) -> str:
    if signature is None:
        return "it is not signed"
    common = _common_fields(signature)
    if isinstance(common, str):
        return f"signature field {common} is missing or invalid"
    signer_agent, kid, ts, raw = common
    if not isinstance(task_id, str) or not isinstance(status, str):
        return "task id or status is not a string"
    entry = keyring.entry(kid)
    if entry is None:
        return f"key {kid} is not in the keyring"
    key_status = entry.status(now)
    if key_status is KeyStatus.REVOKED or key_status is KeyStatus.EXPIRED:
        return f"key {kid} of {entry.agent} is {key_status}"
    if entry.agent != signer_agent or (agent is not None and entry.agent != agent):
        return f"signed by {entry.agent}, expected {agent or _show(signer_agent)}"
    try:
        data = _result_bytes(
            agent=signer_agent, kid=kid, ts=ts, task_id=task_id, status=status, result_digest=digest(result)
        )
    except (TypeError, ValueError, RecursionError):
        return "result is not canonical JSON"
    try:
        entry.verify_key.verify(data, raw)
    except BadSignatureError:
        return f"signature by {kid} does not match"
    return ""


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
    """Check a result's signature (and signer, if ``agent`` is given). Raises only ResultSignatureError."""
    at = time.time() if now is None else now
    try:
        problem = _verify_result(keyring, task_id, status, result, signature, agent, at)
    except Exception as exc:
        problem = f"unexpected {type(exc).__name__} while verifying"
    if problem:
        raise ResultSignatureError(f"result of task {_show(task_id)} is not authentic: {problem}")


# ---- remote control (Celery's broadcast commands) and their replies ----

_CONTROL_DOMAIN: Final = b"xnai-control-v1\n"
_REPLY_DOMAIN: Final = b"xnai-control-reply-v1\n"


def _control_bytes(domain: bytes, *, agent: str, kid: str, ts: float, nonce: str, body_digest: str) -> bytes:
    doc = {"v": SIG_VERSION, "agent": agent, "key_id": kid, "ts": ts, "nonce": nonce, "body_digest": body_digest}
    return domain + _CANONICAL.encode(doc).encode("ascii")


def _sign_control_like(domain: bytes, signer: Signer, body: Any, now: float | None) -> dict[str, str | float | int]:
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
        "sig": base64.b64encode(signer.sign(data)).decode("ascii"),
    }


def sign_control(signer: Signer, *, body: Any, now: float | None = None) -> dict[str, str | float | int]:
    """The ``xnai_sig`` header of a remote-control message: its whole body (method, arguments, destination,
    reply address), a timestamp and a nonce."""
    return _sign_control_like(_CONTROL_DOMAIN, signer, body, now)


def sign_reply(signer: Signer, *, ticket: str, body: Any, now: float | None = None) -> dict[str, str | float | int]:
    """The ``xnai_sig`` header of a worker's reply to a control message (the ticket is signed with the body)."""
    return _sign_control_like(_REPLY_DOMAIN, signer, {"ticket": ticket, "reply": body}, now)


@dataclass(frozen=True, slots=True)
class VerifiedControl:
    """Who signed a control message or reply, and its nonce and time."""

    agent: str
    kid: str
    ts: float
    nonce: str


def _verify_control_like(domain: bytes, keyring: Keyring, body: Any, signature: Any, now: float) -> VerifiedControl:
    if signature is None:
        raise MessageRejected(Reason.UNSIGNED, f"no {SIG_HEADER} header")
    common = _common_fields(signature)
    if isinstance(common, str):
        raise _malformed(f"{SIG_HEADER} field {common} is missing or invalid")
    nonce = signature.get("nonce")
    if not isinstance(nonce, str) or not _HEX32.fullmatch(nonce):
        raise _malformed(f"{SIG_HEADER} field nonce is missing or invalid")
    agent, kid, ts, raw = common
    entry, _ = _usable_key(keyring, kid, agent, now)
    try:
        data = _control_bytes(domain, agent=agent, kid=kid, ts=ts, nonce=nonce, body_digest=digest(body))
    except (TypeError, ValueError, RecursionError):
        raise _malformed("body is not canonical JSON") from None
    try:
        entry.verify_key.verify(data, raw)
    except BadSignatureError:
        raise MessageRejected(Reason.BAD_SIGNATURE, f"signature by {kid} does not match") from None
    return VerifiedControl(agent=entry.agent, kid=kid, ts=float(ts), nonce=nonce)


def verify_control(keyring: Keyring, *, body: Any, signature: Any, now: float, max_age_s: float) -> VerifiedControl:
    """Check a control message's signature and age (who may send what is the caller's check).

    Raises only :class:`MessageRejected`.
    """
    try:
        verified = _verify_control_like(_CONTROL_DOMAIN, keyring, body, signature, now)
    except MessageRejected:
        raise
    except Exception as exc:
        raise _malformed(f"unexpected {type(exc).__name__} while verifying") from None
    if now - verified.ts > max_age_s:
        raise MessageRejected(Reason.EXPIRED, f"signed {now - verified.ts:.0f} s ago, more than {max_age_s:g} s")
    if verified.ts - now > MAX_SKEW_S:
        raise MessageRejected(Reason.FUTURE, f"signed {verified.ts - now:.0f} s in the future")
    return verified


def verify_reply(keyring: Keyring, *, ticket: Any, body: Any, signature: Any, now: float) -> VerifiedControl:
    """Check a control reply's signature over its ticket and body. Raises only :class:`MessageRejected`."""
    try:
        return _verify_control_like(_REPLY_DOMAIN, keyring, {"ticket": ticket, "reply": body}, signature, now)
    except MessageRejected:
        raise
    except Exception as exc:
        raise _malformed(f"unexpected {type(exc).__name__} while verifying") from None
