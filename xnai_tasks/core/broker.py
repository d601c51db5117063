"""Direct Redis access for the parts Celery does not cover: reachability, queue depths."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from xnai_tasks.core import constants as c
from xnai_tasks.errors import BrokerUnreachableError
from xnai_tasks.settings import Settings

CONNECT_TIMEOUT_S = 2.0
#: How often :func:`require_reachable` asks again while it waits for a Redis that is starting.
WAIT_STEP_S = 0.1


def connect(url: str, *, timeout: float = CONNECT_TIMEOUT_S, retries: int = 3) -> redis.Redis:
    """A redis-py client for a Celery-style Redis URL (``redis://``, ``rediss://``, ``redis+socket://``).

    ``retries=0`` makes a dead server fail at once (redis-py otherwise retries with backoff for seconds).
    A ``rediss://`` URL from the settings names the CA and client certificate (xnai_tasks.security.tls).
    """
    parts = urlsplit(url)
    retry = Retry(NoBackoff(), retries)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if parts.scheme in ("redis+socket", "unix"):
        return redis.Redis(
            unix_socket_path=parts.path,
            username=username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=retry,
        )
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry)


def require_reachable(settings: Settings, *, wait_s: float = 0.0) -> None:
    """Raise :class:`BrokerUnreachableError` unless Redis answers PING within the connect timeout.

    With ``wait_s``, a Redis that does not answer yet is asked again until ``wait_s`` seconds have passed: for a
    process started together with the Redis it uses (the Procfile starts every line at once).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _ping(settings.broker_url)
            return
        except BrokerUnreachableError:
            if time.monotonic() + WAIT_STEP_S >= deadline:
                raise
        time.sleep(WAIT_STEP_S)


def _ping(url: str) -> None:
    conn = connect(url, retries=0)
    try:
        conn.ping()
    except redis.AuthenticationError:
        return  # it answers; authorisation is decided per command
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnreachableError(f"broker unreachable at {redact(url)}: {exc}{_tls_hint(url, exc)}") from None
    finally:
        conn.close()


def queue_depth(conn: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` over all of kombu's priority lists."""
    pipe = conn.pipeline(transaction=False)
    for key in c.queue_keys(queue):
        pipe.llen(key)
    return int(sum(pipe.execute()))


def redact(url: str) -> str:
    """The URL without its password (nor the TLS file paths a ``rediss://`` one carries), for messages and logs."""
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        query = "&".join(item for item in parts.query.split("&") if item and not item.startswith("ssl_"))
        parts = parts._replace(query=query)
    if not parts.password:
        return parts.geturl() if parts.scheme == "rediss" else url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def _tls_hint(url: str, exc: BaseException) -> str:
    """What a failed certificate check means here, in words."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" not in text:
        return ""
    if "mismatch" in text:
        return " (the server's certificate does not name this host: xnai tls init --host NAME on the Redis host)"
    ca = dict(parse_qsl(urlsplit(url).query)).get("ssl_ca_certs")
    where = ca or "the system's CAs"
    return f" (the server's certificate is not trusted by {where}: is it the CA of xnai tls init?)"


#: Seconds a starting process waits for the embedded Redis, which the Procfile starts beside it.
EMBEDDED_START_WAIT_S = 3.0


def startup_wait_s(settings: Settings) -> float:
    """Seconds a starting worker waits for its broker: an external one must answer at once, the embedded one may
    be starting beside it."""
    return EMBEDDED_START_WAIT_S if settings.embedded else 0.0
