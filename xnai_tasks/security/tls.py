"""TLS between hosts (README, TLS between hosts): where the certificates are, and the TLS settings of both ends.

Everything lives under ``XNAI_HOME/tls/`` (:class:`TlsFiles`), at fixed paths: the CA (``ca.pem``; its key
``ca.key`` only on the host that made it), the Redis host's server certificate (``server.pem``, ``server.key``),
this host's client certificate (``client.pem``, ``client.key``), and client certificates made for other hosts
(``clients/NAME.pem``, ``clients/NAME.key``). A host that joins gets ``ca.pem``, ``client.pem`` and
``client.key`` at exactly these paths. Keys are mode 0600.

A ``rediss://`` XNAI_REDIS_URL is completed with these paths (:func:`with_tls_files`), so every connection
made from the URL (Celery's broker and result backend, redis-py, the async client) verifies the server against
the CA and presents this host's client certificate; :func:`redis_ssl_options` gives the same settings as
keyword arguments (Celery's ``broker_use_ssl``, ``redis_backend_use_ssl``, Flower).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlsplit

TLS_DIR: Final = "tls"
#: The oldest protocol either end accepts.
MIN_VERSION: Final = ssl.TLSVersion.TLSv1_2
#: URL query parameters naming TLS files or checks (redis-py's, Celery's and kombu's names).
SSL_QUERY_PREFIX: Final = "ssl_"
#: A host's name in its client certificate (it names the files ``clients/NAME.pem`` and ``clients/NAME.key``).
CLIENT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files of one XNAI_HOME, at fixed paths (a joining host's bundle puts them here)."""

    folder: Path

    @classmethod
    def of(cls, home: Path) -> TlsFiles:
        return cls(home / TLS_DIR)

    @property
    def ca(self) -> Path:
        """The CA certificate every host trusts (and the proxy checks client certificates against)."""
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key: only on the host that ran ``xnai tls init``."""
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_cert(self) -> Path:
        """This host's client certificate, presented on every ``rediss://`` connection."""
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def clients_dir(self) -> Path:
        """Client certificates made for other hosts (``xnai tls client NAME``)."""
        return self.folder / "clients"

    def issued_client(self, name: str) -> tuple[Path, Path]:
        """The certificate and key made for host ``name``, to be copied to its ``client.pem`` and ``client.key``."""
        return self.clients_dir / f"{name}.pem", self.clients_dir / f"{name}.key"

    def has_client_cert(self) -> bool:
        return self.client_cert.is_file() and self.client_key.is_file()


def is_tls_url(url: str) -> bool:
    return url.startswith("rediss://")


def redis_ssl_options(files: TlsFiles) -> dict[str, Any]:
    """redis-py's (and Celery's, kombu's, Flower's) TLS keyword arguments: verify the server and its host name
    against the CA (the system's CAs when there is no ``ca.pem``), present the client certificate if there is one."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if files.ca.is_file():
        options["ssl_ca_certs"] = str(files.ca)
    if files.has_client_cert():
        options["ssl_certfile"] = str(files.client_cert)
        options["ssl_keyfile"] = str(files.client_key)
    return options


def with_tls_files(url: str, home: Path) -> str:
    """A ``rediss://`` URL with the TLS files of ``home`` as query parameters (the form redis-py, Celery's result
    backend and kombu read); any other URL, or one that already names TLS parameters, unchanged."""
    if not is_tls_url(url) or any(key.startswith(SSL_QUERY_PREFIX) for key, _ in parse_qsl(urlsplit(url).query)):
        return url
    files = TlsFiles.of(home)
    params = ["ssl_cert_reqs=required"]
    if files.ca.is_file():
        params.append(f"ssl_ca_certs={quote(str(files.ca), safe='/')}")
    if files.has_client_cert():
        params.append(f"ssl_certfile={quote(str(files.client_cert), safe='/')}")
        params.append(f"ssl_keyfile={quote(str(files.client_key), safe='/')}")
    head, sep, fragment = url.partition("#")
    joined = f"{head}{'&' if '?' in head else '?'}{'&'.join(params)}"
    return f"{joined}{sep}{fragment}"


def client_context(params: Mapping[str, Any]) -> ssl.SSLContext:
    """A client context from redis-py style parameters (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_cert_reqs``, ``ssl_check_hostname``): what the async client's own connection uses."""
    context = ssl.create_default_context(cafile=params.get("ssl_ca_certs") or None)
    context.minimum_version = MIN_VERSION
    if params.get("ssl_certfile"):
        context.load_cert_chain(str(params["ssl_certfile"]), params.get("ssl_keyfile") or None)
    if _cert_reqs(params.get("ssl_cert_reqs")) == ssl.CERT_NONE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif params.get("ssl_check_hostname") in (False, "false", "False"):
        context.check_hostname = False
    return context


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The TLS terminator's context: TLS 1.2 or later, this host's server certificate, and a client certificate
    signed by the CA required of every peer (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(files.ca))
    context.load_cert_chain(str(files.server_cert), str(files.server_key))
    return context


def _cert_reqs(value: Any) -> ssl.VerifyMode:
    if isinstance(value, ssl.VerifyMode):
        return value
    if value is None:
        return ssl.CERT_REQUIRED
    names = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}
    return names.get(str(value).lower().removeprefix("cert_"), ssl.CERT_REQUIRED)
