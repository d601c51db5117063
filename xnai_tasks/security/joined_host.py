"""A host joined to a hub (``xnai host join``): ``XNAI_HOME/host.json`` (mode 0600).

It names the hub's Redis URL and holds, for each role this host runs, that role's URL with its own password. The
settings read it once at start when ``XNAI_REDIS_URL`` is unset (:meth:`xnai_tasks.settings.Settings.from_env`), so
``xnai worker ROLE`` on the host connects to the hub as ROLE with no variable set; a ``rediss://`` URL is completed
with this host's TLS files (:func:`xnai_tasks.security.tls.with_tls_files`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from xnai_tasks.core import constants as c
from xnai_tasks.core.files import read_private, write_atomic
from xnai_tasks.errors import SettingsError, UsageError

JOINED_VERSION: Final = 1
#: Host names a plain ``redis://`` hub URL may name (besides 127.0.0.0/8 and ::1): this machine, never a network.
LOOPBACK_NAMES: Final = ("localhost",)
_MAX_FILE: Final = 1 << 20


def joined_host_path(home: Path) -> Path:
    """Path of ``host.json``."""
    return home / c.JOINED_HOST_FILE


@dataclass(frozen=True)
class JoinedHost:
    """The hub this home joined, and each role's URL carrying its password (never shown by ``repr``)."""

    home: Path
    hub: str
    role_urls: Mapping[str, str] = field(repr=False)

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this host runs, in the order of :data:`~xnai_tasks.core.constants.ROLES`."""
        return tuple(role for role in c.ROLES if role in self.role_urls)

    def url(self, role: str) -> str:
        """The URL ``role`` connects with; SettingsError when this host holds no credential of it."""
        from xnai_tasks.security.tls import with_tls_files

        found = self.role_urls.get(role)
        if found is None:
            raise SettingsError(
                f"this host joined {self.hub} for {', '.join(self.roles)} only: it holds no credential of {role!r}"
            )
        return with_tls_files(found, self.home)


def check_hub_url(raw: str) -> str:
    """A hub URL for a bundle: a Redis URL naming a host (or a socket) and no user or password; else UsageError."""
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"--url {raw!r} is malformed: {exc}") from None
    if parts.scheme not in c.REDIS_SCHEMES:  # a socket URL: a second XNAI_HOME on the hub's own machine
        raise UsageError(f"--url {raw!r} must start with one of {', '.join(s + '://' for s in c.REDIS_SCHEMES)}")
    if parts.username or parts.password:
        raise UsageError(f"--url {raw!r} must not carry a user or password: each role's own is added")
    if parts.scheme in ("redis+socket", "unix"):
        if not parts.path:
            raise UsageError(f"--url {raw!r} names no socket path")
    elif not parts.hostname or port == 0:
        raise UsageError(f"--url {raw!r} names no host or port")
    return raw


def check_not_in_clear(raw: str, what: str) -> str:
    """``raw`` unless it is a plain ``redis://`` URL to a host that is not loopback (its role passwords and signed
    messages would cross the network in clear): then UsageError naming ``what`` (``--url``, ``hub``)."""
    parts = urlsplit(raw)
    host = parts.hostname or ""
    if parts.scheme != "redis" or host.lower() in LOOPBACK_NAMES or _is_loopback_address(host):
        return raw
    raise UsageError(
        f"{what} {raw!r} is plain redis:// to {host}, which is not loopback: passwords and messages would cross "
        "the network in clear; use rediss:// (xnai tls init on the hub, XNAI_REDIS_TLS_PORT)"
    )


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_server(url: str, hub: str) -> bool:
    """Whether ``url`` points at the hub ``hub`` (scheme, host, port, path and query; the userinfo aside)."""
    a, b = urlsplit(url), urlsplit(hub)
    return (a.scheme, a.hostname, a.port, a.path, a.query) == (b.scheme, b.hostname, b.port, b.path, b.query)


def read_joined(home: Path) -> JoinedHost | None:
    """This home's :class:`JoinedHost`, or None when it joined no hub. SettingsError (naming the file) when the
    file is readable by others, malformed, or names a URL that is not the hub's."""
    path = joined_host_path(home)
    try:
        raw, mode = read_private(path, _MAX_FILE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SettingsError(f"{path} cannot be read: {exc.strerror}") from None
    if mode & 0o077:
        raise SettingsError(f"{path} has mode {mode:04o}, readable by others: run chmod 600 {path}")
    try:
        return _parse(home, json.loads(raw))
    except (ValueError, TypeError, KeyError, UsageError) as exc:
        raise SettingsError(f"{path} is malformed: {exc}; run `xnai host join BUNDLE` again") from None


def write_joined(home: Path, hub: str, role_urls: Mapping[str, str]) -> Path:
    """Write ``host.json`` (mode 0600, atomically): from now on this home's processes connect to ``hub``."""
    doc = {"version": JOINED_VERSION, "hub": hub, "roles": dict(sorted(role_urls.items()))}
    path = joined_host_path(home)
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8"), mode=0o600, durable=True)
    return path


def _parse(home: Path, doc: Any) -> JoinedHost:
    if not isinstance(doc, dict) or doc.get("version") != JOINED_VERSION:
        raise ValueError(f"expected an object with version {JOINED_VERSION}")
    hub = check_hub_url(doc["hub"])
    roles = doc["roles"]
    if not isinstance(roles, dict) or not roles:
        raise ValueError("roles is not a non-empty object")
    for role, url in roles.items():
        if role not in c.ROLES:
            raise ValueError(f"unknown role {role!r}")
        if not isinstance(url, str) or urlsplit(url).username != role or not same_server(url, hub):
            raise ValueError(f"the URL of {role} is not the hub's with the user {role}")
    return JoinedHost(home=home, hub=hub, role_urls=dict(roles))
