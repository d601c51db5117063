"""One agent's Ed25519 key pair: the public :class:`KeyEntry` the keyring lists, and the :class:`Signer`
holding the private key. Private keys are never logged (``repr`` leaves them out)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class KeyStatus(StrEnum):
    """Life-cycle state of a key at a given time."""

    ACTIVE = "active"
    GRACE = "grace"
    EXPIRED = "expired"
    REVOKED = "revoked"


def key_id(public_key: bytes) -> str:
    """The key id: the first 16 hex characters of the SHA-256 of the raw public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyEntry:
    """One public key of the keyring, with its cached :class:`nacl.signing.VerifyKey`."""

    kid: str
    agent: str
    public_key: bytes
    created_at: float
    expires_at: float | None = None
    revoked: bool = False
    verify_key: Any = field(default=None, repr=False, compare=False)

    def status(self, now: float) -> KeyStatus:
        """Active (signs and verifies), grace (verifies only), expired or revoked (neither)."""
        if self.revoked:
            return KeyStatus.REVOKED
        if self.expires_at is None:
            return KeyStatus.ACTIVE
        return KeyStatus.GRACE if now < self.expires_at else KeyStatus.EXPIRED

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "agent": self.agent,
            "public_key": self.public_key.hex(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked": self.revoked,
        }


@dataclass(frozen=True)
class Signer:
    """An agent's active private key. ``repr`` never shows the key."""

    agent: str
    kid: str
    signing_key: Any = field(repr=False, compare=False)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        signature: bytes = self.signing_key.sign(data).signature
        return signature
