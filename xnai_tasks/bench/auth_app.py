"""The second baseline of ``xnai bench roundtrip``: Celery's own ``auth`` serializer (RSA-2048, SHA-256).

Same Redis, same worker settings as the plain app; the bench makes a self-signed certificate under
its private XNAI_HOME and passes its folder in ``XNAI_BENCH_AUTH_DIR``.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from celery import Celery

from xnai_tasks.bench.plain_app import baseline_config

QUEUE = "bench_auth"
AUTH_DIR_VARIABLE = "XNAI_BENCH_AUTH_DIR"


def make_certificate(folder: Path) -> None:
    """An RSA-2048 key and a self-signed certificate: ``folder/key.pem``, ``folder/certs/cert.pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xnai-bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (folder / "certs").mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "key.pem").write_bytes(key_bytes)
    (folder / "certs" / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _config() -> dict[str, Any]:
    folder = Path(os.environ[AUTH_DIR_VARIABLE])
    return {
        **baseline_config(QUEUE),
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "security_key": str(folder / "key.pem"),
        "security_certificate": str(folder / "certs" / "cert.pem"),
        "security_cert_store": str(folder / "certs" / "*.pem"),
        "security_digest": "sha256",
    }


app = Celery("auth", set_as_current=False)
app.add_defaults(_config)


@app.task(name="auth.noop")  # type: ignore[untyped-decorator]
def noop(value: Any = None) -> Any:
    """Return the value: the same work as our ``echo``."""
    return value


@app.on_after_configure.connect  # type: ignore[untyped-decorator]
def _secure(sender: Any = None, **_: Any) -> None:
    """Register the auth serializer as soon as the app is configured, in the worker and the bench alike."""
    sender.setup_security()
