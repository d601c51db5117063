"""Redis URLs of ACL users: a URL with a user's credentials, and the user and database a URL names."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from xnai_tasks.security.acl import USERS
from xnai_tasks.security.password_file import ensure_passwords
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
    (which always runs with ACLs), the configured URL unchanged for an external one."""
    if settings.embedded:
        return role_broker_url(settings, user, ensure_passwords(settings.home))
    return settings.broker_url
