"""Host bundles: exactly what a worker host needs for its roles, in one JSON file, and installing one elsewhere.

``xnai host bundle ROLE... --url URL`` on the hub writes, for each role named, its Redis URL carrying its own
password (pointing at ``URL``) and its active private key; the public keyring; and, when the hub has a TLS CA, the
CA and a client certificate and key made for that host. Nothing else: no other role's password or private key, not
the admin password. The file is mode 0600, plain JSON, and ends with the SHA-256 of the rest (``digest``),
which ``xnai host join`` checks and prints: it catches a damaged or edited file; against someone who could also
rewrite the digest, carry the bundle over a channel you trust (it holds secrets anyway) and compare the two digests.

``xnai host join BUNDLE`` checks everything first (mode, fields, digest, each private key against its public key
in the keyring, each URL's user and server), then installs it into this XNAI_HOME, every file mode 0600: the keys
and keyring under ``keys/``, the TLS files under ``tls/`` (:class:`~xnai_tasks.security.tls.TlsFiles`), and last
``host.json`` (:mod:`.joined_host`), which from then on points this home's processes at the hub.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from nacl.signing import SigningKey

from xnai_tasks.core import constants as c
from xnai_tasks.core.files import read_private, write_atomic
from xnai_tasks.errors import KeyringError, UsageError, XnaiError
from xnai_tasks.security.joined_host import (
    JoinedHost,
    check_hub_url,
    check_not_in_clear,
    joined_host_path,
    read_joined,
    same_server,
    write_joined,
)
from xnai_tasks.security.key_pair import KeyStatus, key_id
from xnai_tasks.security.key_store import (
    keyring_path,
    locked,
    parse_keyring,
    private_key_path,
    read_keyring,
    unlink_quiet,
)
from xnai_tasks.security.tls import CLIENT_NAME, TlsFiles

FORMAT: Final = "xnai-host-bundle"
VERSION: Final = 1
#: Every field of a bundle, and of each of its roles and its TLS part: a bundle with any other is refused.
FIELDS: Final = ("format", "version", "hub", "roles", "keyring", "tls", "digest")
ROLE_FIELDS: Final = ("url", "kid", "private_key")
TLS_FIELDS: Final = ("ca", "cert", "key")
_MAX_FILE: Final = 16 * 1024 * 1024
_SEED_RE: Final = re.compile(r"[0-9a-f]{64}")
_PEM_RE: Final = re.compile(r"-----BEGIN [A-Z0-9 ]+-----\n[\s\S]+-----END [A-Z0-9 ]+-----\n?")


@dataclass(frozen=True)
class RoleCredential:
    """One role's part of a bundle: its URL with its password, and its private key (``repr`` shows neither)."""

    role: str
    url: str = field(repr=False)
    kid: str
    seed: bytes = field(repr=False)


@dataclass(frozen=True)
class TlsMaterial:
    """The CA certificate, and the client certificate and key of the host the bundle is for (PEM text)."""

    ca: str
    cert: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class Bundle:
    """What one worker host needs; :meth:`to_json` is the file's content."""

    hub: str
    roles: tuple[RoleCredential, ...]
    keyring: dict[str, Any] = field(repr=False)
    tls: TlsMaterial | None = None

    def body(self) -> dict[str, Any]:
        """Every field but the digest."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "hub": self.hub,
            "roles": {
                r.role: {"url": r.url, "kid": r.kid, "private_key": r.seed.hex()}
                for r in sorted(self.roles, key=lambda r: r.role)
            },
            "keyring": self.keyring,
            "tls": None if self.tls is None else {"ca": self.tls.ca, "cert": self.tls.cert, "key": self.tls.key},
        }

    def digest(self) -> str:
        return digest_of(self.body())

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "digest": self.digest()}


def digest_of(body: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of a bundle's fields but the digest, as canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# ---- making one, on the hub ----


def make_bundle(
    home: Path, passwords: Mapping[str, str], roles: Sequence[str], hub: str, *, host: str | None
) -> Bundle:
    """The bundle of ``roles`` from the hub's ``home``: their passwords (``passwords``: the hub's), their active
    private keys and the keyring; the CA and a client certificate for ``host`` when the hub has a TLS CA (then
    ``host`` is required: each host its own certificate, never a TLS identity shared by hosts of the same roles)."""
    from xnai_tasks.security.keyring import load_signer
    from xnai_tasks.security.redis_urls import with_credentials

    check_not_in_clear(check_hub_url(hub), "--url")
    wanted = tuple(dict.fromkeys(roles))
    if not wanted:
        raise UsageError("name at least one role: xnai host bundle ROLE... --url URL")
    unknown = [r for r in wanted if r not in c.ROLES]
    if unknown:
        raise UsageError(f"unknown role {unknown[0]!r} (roles: {', '.join(c.ROLES)})")
    credentials = []
    for role in wanted:
        signer = load_signer(home, role)
        credentials.append(
            RoleCredential(
                role=role,
                url=with_credentials(hub, role, passwords[role]),
                kid=signer.kid,
                seed=bytes(signer.signing_key),
            )
        )
    read_keyring(keyring_path(home))  # refuse a bad keyring here, not on the host
    keyring = json.loads(keyring_path(home).read_text(encoding="utf-8"))
    return Bundle(hub=hub, roles=tuple(credentials), keyring=keyring, tls=_tls_for(home, host))


def _tls_for(home: Path, host: str | None) -> TlsMaterial | None:
    """The CA and a client certificate for ``host`` (made now, if the hub holds the CA's key and has none yet)."""
    files = TlsFiles.of(home)
    if not files.ca.is_file():
        return None
    if host is None:
        raise UsageError("this hub has a TLS CA: name the host with --host NAME (each host its own certificate)")
    if not CLIENT_NAME.fullmatch(host):  # checked before it names a file
        raise UsageError(f"--host {host!r} is not a host name (letters, digits, '.', '_', '-'; at most 64)")
    cert, key = files.issued_client(host)
    if not (cert.is_file() and key.is_file()):
        if not files.ca_key.is_file():
            raise UsageError(f"no client certificate {cert} for {host!r}, and no CA key here to make one")
        from xnai_tasks.security.certificates import issue_client

        issue_client(files, host)
    return TlsMaterial(ca=files.ca.read_text(), cert=cert.read_text(), key=key.read_text())


def write_bundle(path: Path, bundle: Bundle) -> str:
    """Write the bundle (mode 0600, atomically); its digest."""
    doc = bundle.to_json()
    try:
        write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8"), mode=0o600)
    except OSError as exc:
        raise UsageError(f"bundle {path} cannot be written: {exc.strerror}") from None
    return str(doc["digest"])


# ---- reading one, on the joining host ----


def read_bundle(path: Path) -> Bundle:
    """The bundle in ``path``, checked; UsageError (one line naming the file and the first problem) otherwise."""
    try:
        return _parse(_read_private(path))
    except (ValueError, TypeError, KeyError, AttributeError, XnaiError) as exc:
        raise UsageError(f"bundle {path} refused: {exc}") from None


def _read_private(path: Path) -> Any:
    try:
        raw, mode = read_private(path, _MAX_FILE)
    except OSError as exc:
        raise UsageError(f"cannot be opened: {exc.strerror}") from None
    if mode & 0o077:
        raise UsageError(f"mode {mode:04o} lets others read its secrets; run chmod 600 {path} if it is yours")
    if len(raw) > _MAX_FILE:
        raise UsageError("too large")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"not JSON ({exc})") from None


def _parse(doc: Any) -> Bundle:
    _exact_fields(doc, FIELDS, "the bundle")
    if doc["format"] != FORMAT or doc["version"] != VERSION:
        raise UsageError(f"not an {FORMAT} of version {VERSION}")
    body = {k: v for k, v in doc.items() if k != "digest"}
    if doc["digest"] != digest_of(body):
        raise UsageError("its digest does not match its content (damaged or edited)")
    if not isinstance(doc["hub"], str):
        raise UsageError("hub is not a URL")
    try:
        hub = check_hub_url(doc["hub"])
    except UsageError:
        raise UsageError(f"hub {doc['hub']!r} is not a Redis URL without credentials") from None
    check_not_in_clear(hub, "hub")
    entries = {e.kid: e for e in _keyring_entries(doc["keyring"])}
    if not isinstance(doc["roles"], dict) or not doc["roles"]:
        raise UsageError("roles is not a non-empty object")
    roles = tuple(_role(role, part, hub, entries) for role, part in doc["roles"].items())
    return Bundle(hub=hub, roles=roles, keyring=doc["keyring"], tls=_tls(doc["tls"]))


def _exact_fields(value: Any, fields: Sequence[str], what: str) -> None:
    if not isinstance(value, dict):
        raise UsageError(f"{what} is not a JSON object")
    missing = [f for f in fields if f not in value]
    if missing:
        raise UsageError(f"{what} has no field {missing[0]!r}")
    extra = sorted(set(value) - set(fields))
    if extra:
        raise UsageError(f"{what} has an unknown field {extra[0]!r}")


def _keyring_entries(doc: Any) -> list[Any]:
    """The keyring's keys, checked as a keyring file is."""
    try:
        entries, _ = parse_keyring(doc)
    except (ValueError, TypeError, KeyError, AttributeError, KeyringError) as exc:
        raise UsageError(f"its keyring is malformed: {exc}") from None
    return entries


def _role(role: Any, part: Any, hub: str, entries: Mapping[str, Any]) -> RoleCredential:
    if role not in c.ROLES:
        raise UsageError(f"unknown role {role!r}")
    _exact_fields(part, ROLE_FIELDS, f"role {role}")
    url, kid, seed_hex = part["url"], part["kid"], part["private_key"]
    if not isinstance(url, str) or urlsplit(url).username != role or not urlsplit(url).password:
        raise UsageError(f"the URL of {role} does not carry the user {role} and a password")
    if not same_server(url, hub):
        raise UsageError(f"the URL of {role} does not point at the hub {hub}")
    if not isinstance(seed_hex, str) or not _SEED_RE.fullmatch(seed_hex):
        raise UsageError(f"the private key of {role} is not 64 hex characters")
    seed = bytes.fromhex(seed_hex)
    public = bytes(SigningKey(seed).verify_key)
    entry = entries.get(kid) if isinstance(kid, str) else None
    if entry is None or entry.agent != role or entry.public_key != public or key_id(public) != kid:
        raise UsageError(f"the private key of {role} is not the key {kid!r} of {role} in its keyring")
    if entry.status(time.time()) is not KeyStatus.ACTIVE:
        raise UsageError(f"the key {kid} of {role} is {entry.status(time.time())} in its keyring")
    return RoleCredential(role=role, url=url, kid=kid, seed=seed)


def _tls(part: Any) -> TlsMaterial | None:
    if part is None:
        return None
    _exact_fields(part, TLS_FIELDS, "its tls part")
    for name in TLS_FIELDS:
        if not isinstance(part[name], str) or not _PEM_RE.fullmatch(part[name].strip() + "\n"):
            raise UsageError(f"tls.{name} is not PEM text")
    return TlsMaterial(ca=part["ca"], cert=part["cert"], key=part["key"])


# ---- installing one ----


def join(home: Path, bundle: Bundle) -> JoinedHost:
    """Install ``bundle`` into ``home`` (every file mode 0600); refuse a home with keys of its own (a hub's, or one
    that ran ``xnai keys init``). Joining again replaces what an earlier bundle installed."""
    rejoin = joined_host_path(home).exists()
    if not rejoin and keyring_path(home).exists():
        raise UsageError(
            f"{home} has a keyring of its own (is it the hub?): join from the XNAI_HOME of the host of the worker"
        )
    with locked(home) as folder:
        wanted = {private_key_path(home, r.role, r.kid) for r in bundle.roles}
        if rejoin:  # an earlier bundle's keys that this one does not hold
            for old in folder.glob("*.key"):
                if old not in wanted:
                    unlink_quiet(old)
        for credential in bundle.roles:
            key_file = private_key_path(home, credential.role, credential.kid)
            write_atomic(key_file, credential.seed.hex().encode("ascii") + b"\n", mode=0o600, durable=True)
        text = json.dumps(bundle.keyring, indent=2, sort_keys=True) + "\n"
        write_atomic(keyring_path(home), text.encode("utf-8"), mode=0o600, durable=True)
    if bundle.tls is not None:
        _install_tls(TlsFiles.of(home), bundle.tls)
    write_joined(home, bundle.hub, {r.role: r.url for r in bundle.roles})
    joined = read_joined(home)
    assert joined is not None
    return joined


def _install_tls(files: TlsFiles, tls: TlsMaterial) -> None:
    files.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, text in ((files.ca, tls.ca), (files.client_cert, tls.cert), (files.client_key, tls.key)):
        write_atomic(path, text.encode("ascii"), mode=0o600, durable=True)
