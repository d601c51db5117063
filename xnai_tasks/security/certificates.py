"""A private CA and the certificates it signs (``xnai tls init``, ``xnai tls client``): EC P-256 keys.

The CA is made once and kept (a new one would void every host's certificates); the server certificate names the
Redis host (its names and addresses, plus localhost and 127.0.0.1) and may be made again with other names; each
client certificate names one host. Keys are written mode 0600, certificates 0644.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xnai_tasks.core.files import write_atomic
from xnai_tasks.errors import UsageError
from xnai_tasks.security.tls import CLIENT_NAME, TlsFiles

CA_DAYS: Final = 3650
#: Days a server or client certificate is valid (825: the longest most TLS clients accept for a server).
LEAF_DAYS: Final = 825
ORGANIZATION: Final = "xnai-tasks"
#: Names every server certificate carries besides the given ones (clients on the Redis host itself).
LOCAL_NAMES: Final = ("localhost", "127.0.0.1")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")

Key = ec.EllipticCurvePrivateKey


def ensure_ca(files: TlsFiles) -> tuple[x509.Certificate, Key, bool]:
    """The CA of this home: the one already there, else a new one. True when it was made now."""
    if files.ca.is_file():
        if not files.ca_key.is_file():
            raise UsageError(f"{files.ca} has no key beside it: certificates are made on the host that made the CA")
        return load_certificate(files.ca), load_key(files.ca_key), False
    files.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([_org(), x509.NameAttribute(NameOID.COMMON_NAME, f"xnai-tasks CA {socket.gethostname()}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(files.ca_key, key)
    _write_cert(files.ca, cert)
    return cert, key, True


def issue_server(files: TlsFiles, hosts: Iterable[str]) -> list[str]:
    """Make the server certificate (``server.pem``, ``server.key``) for ``hosts`` plus :data:`LOCAL_NAMES`; the
    names it carries."""
    names = list(dict.fromkeys([*(check_host(h) for h in hosts), *LOCAL_NAMES]))
    ca_cert, ca_key, _ = ensure_ca(files)
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    _issue(
        ca_cert,
        ca_key,
        common_name=names[0],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
        cert_path=files.server_cert,
        key_path=files.server_key,
    )
    return names


def issue_client(files: TlsFiles, name: str, *, cert_path: Path | None = None, key_path: Path | None = None) -> Path:
    """Make a client certificate for host ``name``: at ``clients/NAME.pem`` unless paths are given. Its path."""
    if not CLIENT_NAME.fullmatch(name):
        raise UsageError(f"{name!r} is not a client name (letters, digits, '.', '_', '-'; at most 64)")
    ca_cert, ca_key, _ = ensure_ca(files)
    default_cert, default_key = files.issued_client(name)
    cert_path, key_path = cert_path or default_cert, key_path or default_key
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _issue(
        ca_cert,
        ca_key,
        common_name=name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
        cert_path=cert_path,
        key_path=key_path,
    )
    return cert_path


def check_host(raw: str) -> str:
    """A host name or IP address for the server certificate; UsageError otherwise."""
    value = raw.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if len(value) > 253 or not _HOST_NAME.fullmatch(value):
        raise UsageError(f"--host {raw!r} is neither a host name nor an IP address")
    return value.lower()


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> Key:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{path} is not an EC private key")
    return key


def describe(path: Path) -> str:
    """One line about a certificate: its subject, names and expiry."""
    cert = load_certificate(path)
    subject = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    text = f"{path}: {subject[0].value!s}" if subject else f"{path}: ?"
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        text += f" [{', '.join(str(getattr(n, 'value', n)) for n in sans)}]"
    except x509.ExtensionNotFound:
        pass
    return f"{text}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"


def _issue(
    ca_cert: x509.Certificate,
    ca_key: Key,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
    cert_path: Path,
    key_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([_org(), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key_path, key)
    _write_cert(cert_path, cert)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _org() -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: Key) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomic(path, pem, mode=0o600, durable=True)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, durable=True)
