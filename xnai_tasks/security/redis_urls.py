"""Redis URLs of ACL users: a URL with a user's credentials, and the user and database a URL names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

from xnai_tasks.core import constants as c
from xnai_tasks.security.acl import ADMIN, USERS
from xnai_tasks.security.password_file import ensure_passwords, passwords_path
from xnai_tasks.settings import Settings


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` as its userinfo (replacing any), the form kombu, Celery's result
    backend, redis-py and Flower all parse: ``redis://u:p@host:6379/0``, ``redis+socket://u:p@/abs/redis.sock``.

    Works on Celery's ``module:Backend+scheme://...`` result backend form too (only the part after
    ``://`` is touched).
    """
    head, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a URL: {url!r}")
    end = min((i for i in (rest.find(ch) for ch in "/?#") if i >= 0), default=len(rest))
    hostport = rest[:end].rpartition("@")[2]
    return f"{head}://{quote(user, safe='')}:{quote(password, safe='')}@{hostport}{rest[end:]}"


def role_broker_url(settings: Settings, user: str, passwords: Mapping[str, str]) -> str:
    """The broker (and result backend) URL carrying ``user``'s credentials."""
    if user not in USERS:
        raise ValueError(f"unknown ACL user {user!r} (users: {', '.join(USERS)})")
    return with_credentials(settings.broker_url, user, passwords[user])


def url_db(url: str) -> int:
    """The Redis database a URL selects (``redis://host/3`` is 3; a socket URL's is in ``?virtual_host=``)."""
    parts = urlsplit(url)
    raw = parts.path.strip("/") if parts.scheme in ("redis", "rediss") else ""
    for key, _, value in (item.partition("=") for item in parts.query.split("&") if item):
        if key in ("virtual_host", "db"):
            raw = value
    return int(raw) if raw.isdigit() else 0


def url_user(url: str) -> str | None:
    """The user name a URL authenticates as, if it names one."""
    username = urlsplit(url).username
    return username or None


def connection_url(settings: Settings, user: str) -> str:
    """The URL a process acting as ``user`` connects with: credentials added for the embedded Redis
    (which always runs with ACLs), the user's own URL on a host joined to a hub (SettingsError when it holds none),
    the configured URL unchanged for an external one."""
    if settings.embedded:
        return role_broker_url(settings, user, ensure_passwords(settings.home))
    if settings.joined_roles:
        from xnai_tasks.security.joined_host import read_joined

        joined = read_joined(settings.home)
        if joined is not None:
            return joined.url(user)
    return settings.broker_url


def embedded_admin_url(home: Path) -> str | None:
    """The admin's URL of the embedded Redis of ``home`` when it has one (its socket and passwords exist), else None."""
    socket = home / c.REDIS_DIR / c.REDIS_SOCKET
    if not socket.exists() or not passwords_path(home).exists():
        return None
    return with_credentials(f"redis+socket://{socket}", ADMIN, ensure_passwords(home)[ADMIN])
