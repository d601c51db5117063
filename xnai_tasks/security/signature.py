"""The signature dict every signed thing carries (task messages, results, control commands and replies).

Each is a JSON object with the layout version, the signing agent, its key id, a timestamp and the
base64 Ed25519 signature (messages and control add a nonce). This module reads those common fields and
checks the key behind them; what exactly is signed is each signed thing's own module:
:mod:`.message_signature`, :mod:`.result_signature`, :mod:`.control_signature`.
Checks raise :class:`~xnai_tasks.errors.MessageRejected` with a :class:`~.refusal.Reason`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from nacl.exceptions import BadSignatureError

from xnai_tasks.errors import MessageRejected
from xnai_tasks.security.key_pair import KeyEntry, KeyStatus, Signer
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.refusal import Reason, show

#: Header (a message's, a control command's or reply's) or result meta field carrying the signature dict.
SIG_HEADER: Final = "xnai_sig"
#: Version of the signed layout; bumped on any change to what is signed.
SIG_VERSION: Final = 1
#: A timestamp this far ahead of the verifier's clock is refused as ``future``.
MAX_SKEW_S: Final = 60.0
#: The longest task name, task id or queue name accepted.
MAX_NAME: Final = 255

_MAX_TS: Final = 1e12
_SIG_B64_LEN: Final = 88
_HEX16: Final = re.compile(r"[0-9a-f]{16}")
_HEX32: Final = re.compile(r"[0-9a-f]{32}")
_AGENT: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SignatureFields:
    """The fields every signature dict has: who signed (agent, key id), when, and the raw signature."""

    agent: str
    kid: str
    ts: float
    raw: bytes


def malformed(detail: str) -> MessageRejected:
    """The refusal of something that is not even well-formed."""
    return MessageRejected(Reason.MALFORMED, detail)


def encode_signature(signer: Signer, data: bytes) -> str:
    """The ``sig`` field: ``signer``'s signature of ``data`` in base64."""
    return base64.b64encode(signer.sign(data)).decode("ascii")


def parse_fields(raw: Any, label: str) -> SignatureFields:
    """The common fields of a signature dict; malformed, naming ``label``'s first bad field, otherwise."""

    def bad(name: str) -> MessageRejected:
        return malformed(f"{label} field {name} is missing or invalid")

    if not isinstance(raw, Mapping):
        raise bad("signature")
    if raw.get("v") != SIG_VERSION or type(raw.get("v")) is not int:
        raise bad("v")
    agent, kid, ts = raw.get("agent"), raw.get("kid"), raw.get("ts")
    if not isinstance(agent, str) or not _AGENT.fullmatch(agent):
        raise bad("agent")
    if not isinstance(kid, str) or not _HEX16.fullmatch(kid):
        raise bad("kid")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not -_MAX_TS <= ts <= _MAX_TS:
        raise bad("ts")  # the range check also refuses NaN, infinities and ints too large for a float
    signature = _signature_bytes(raw.get("sig"))
    if signature is None:
        raise bad("sig")
    return SignatureFields(agent=agent, kid=kid, ts=ts, raw=signature)


def parse_nonce(raw: Mapping[str, Any]) -> str:
    """The ``nonce`` field of a (well-formed) message or control signature dict; malformed if bad."""
    nonce = raw.get("nonce")
    if not isinstance(nonce, str) or not _HEX32.fullmatch(nonce):
        raise malformed(f"{SIG_HEADER} field nonce is missing or invalid")
    return nonce


def usable_key(keyring: Keyring, kid: str, now: float) -> tuple[KeyEntry, KeyStatus]:
    """The key ``kid`` and its status, if it is in the keyring and still verifies (active or in grace)."""
    entry = keyring.entry(kid)
    if entry is None:
        raise MessageRejected(Reason.UNKNOWN_KEY, f"key {kid} is not in the keyring")
    status = entry.status(now)
    if status is KeyStatus.REVOKED or status is KeyStatus.EXPIRED:
        raise MessageRejected(Reason.REVOKED_KEY, f"key {kid} of {entry.agent} is {status}")
    return entry, status


def signer_key(keyring: Keyring, kid: str, agent: str, now: float) -> tuple[KeyEntry, KeyStatus]:
    """As :func:`usable_key`, and the key must belong to ``agent``, the agent the signature names."""
    entry, status = usable_key(keyring, kid, now)
    if entry.agent != agent:
        raise MessageRejected(Reason.BAD_SIGNATURE, f"key {kid} belongs to {entry.agent}, not {show(agent)}")
    return entry, status


def signature_matches(entry: KeyEntry, data: bytes, raw: bytes) -> bool:
    """Whether ``raw`` is ``entry``'s signature of ``data``."""
    try:
        entry.verify_key.verify(data, raw)
    except BadSignatureError:
        return False
    return True


def check_age(ts: float, now: float, max_age_s: float) -> None:
    """Refuse a signature older than ``max_age_s`` (``expired``) or more than :data:`MAX_SKEW_S` ahead (``future``)."""
    if now - ts > max_age_s:
        raise MessageRejected(Reason.EXPIRED, f"signed {now - ts:.0f} s ago, more than {max_age_s:g} s")
    if ts - now > MAX_SKEW_S:
        raise MessageRejected(Reason.FUTURE, f"signed {ts - now:.0f} s in the future")


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
