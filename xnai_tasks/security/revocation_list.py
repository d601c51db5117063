"""The revocation list in Redis: the ids of every revoked key, so a revocation made on the hub reaches every host.

Redis only ever takes trust away: the list names keys that no longer verify, and nothing in it can add a key or a
permission (those travel in a host's bundle, :mod:`.bundle`), so whoever can write it can at worst refuse work, never
forge it. Only the admin user may write it; every other user reads it (:mod:`.acl`, Redis 7). ``xnai keys revoke`` on
the hub publishes it (:func:`publish_from_home`), and the keyring of every process on a joined host reads it at most
every 5 s (:class:`RevocationFeed`, used by :class:`~xnai_tasks.security.keyring.Keyring`). The keyring files stay
what a process trusts first: a joined host keeps what it learned in ``XNAI_HOME/keys/revoked.json`` as well, so a
restart while Redis is away still refuses a revoked key, and a Redis that is away only means no news.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import redis

from xnai_tasks.core import constants as c
from xnai_tasks.core.files import write_atomic

log = logging.getLogger(__name__)

_KID_RE: Final = re.compile(r"[0-9a-f]{16}")
#: A list bigger than this is refused as malformed (a key id is 16 characters: ~50,000 ids).
MAX_BYTES: Final = 1 << 20
#: Seconds a feed waits for Redis: the keyring is read on the way of a message, so a slow Redis must not hold it.
READ_TIMEOUT_S: Final = 1.0
#: Attempts to publish while other writers keep changing the list (WATCH) before giving up.
PUBLISH_ATTEMPTS: Final = 10


def encode(kids: Iterable[str]) -> bytes:
    """The stored form: a sorted JSON list of key ids."""
    return json.dumps(sorted(set(kids))).encode("ascii")


def decode(raw: Any) -> frozenset[str]:
    """The key ids in a stored list (none for a missing one); ValueError when it is not one."""
    if raw is None:
        return frozenset()
    if len(raw) > MAX_BYTES:
        raise ValueError("revocation list too large")
    try:
        kids = json.loads(raw)
    except RecursionError:  # "[[[[..." nested deeper than Python's stack
        raise ValueError("revocation list nested too deep") from None
    if not isinstance(kids, list) or not all(isinstance(k, str) and _KID_RE.fullmatch(k) for k in kids):
        raise ValueError("revocation list is not a list of key ids")
    return frozenset(kids)


def publish(conn: redis.Redis, kids: Iterable[str]) -> frozenset[str]:
    """Add ``kids`` to the list (as admin: no other user may write it); the whole list afterwards.

    A stored list that is malformed is replaced by ``kids`` (one warning): the keyring file ``kids`` comes from is
    the authority, and the list can only take trust away, so nothing the hub decided is lost. RedisError after
    :data:`PUBLISH_ATTEMPTS` attempts that another writer interrupted."""
    key, wanted = c.revoked_keys_key(), frozenset(kids)
    with conn.pipeline(transaction=True) as pipe:
        for _ in range(PUBLISH_ATTEMPTS):
            try:
                pipe.watch(key)
                try:
                    merged = decode(pipe.get(key)) | wanted
                except ValueError as exc:
                    log.warning("the revocation list in Redis is malformed (%s): replacing it with the keyring's", exc)
                    merged = wanted
                pipe.multi()
                pipe.set(key, encode(merged))
                pipe.execute()
                return merged
            except redis.WatchError:
                continue
    raise redis.RedisError(f"{key} changed under each of {PUBLISH_ATTEMPTS} attempts to publish: try again")


def revoked_in_keyring(home: Path) -> frozenset[str]:
    """The revoked keys of ``home``'s keyring file."""
    from xnai_tasks.security.key_store import keyring_path, read_keyring

    entries, _ = read_keyring(keyring_path(home))
    return frozenset(e.kid for e in entries if e.revoked)


def publish_from_home(home: Path, url: str | None = None) -> str | None:
    """Publish the revoked keys of ``home``'s keyring to Redis as admin: to ``url`` (an admin URL), else to the
    embedded Redis of ``home`` if it has one (else nowhere). None when done or nowhere to; else the one-line reason
    it was not (Redis did not take it)."""
    from xnai_tasks.core import broker
    from xnai_tasks.security.redis_urls import embedded_admin_url

    target = url or embedded_admin_url(home)
    if target is None:
        log.info("%s has no embedded Redis: revocations not published (`xnai host publish` does it)", home)
        return None
    kids = revoked_in_keyring(home)
    try:
        conn = broker.connect(target, timeout=READ_TIMEOUT_S * 3, retries=0)
        try:
            publish(conn, kids)
        finally:
            conn.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{broker.redact(target)}: {exc}"
    return None


def cache_path(home: Path) -> Path:
    """Where a joined host keeps the revocations it learned."""
    from xnai_tasks.security.key_store import keys_dir

    return keys_dir(home) / c.REVOKED_CACHE_FILE


def read_cache(path: Path) -> frozenset[str]:
    """The key ids kept in ``path`` (none when it is missing or unreadable: the keyring file still holds its own)."""
    try:
        return decode(path.read_bytes())
    except (OSError, ValueError):
        return frozenset()


class RevocationFeed:
    """The revocation list as one process on a joined host sees it: what it read from Redis, and what it kept.

    :meth:`poll` reads Redis (one GET); the keyring calls it at most every 5 s. What it learns is only ever added
    to, in memory and in the cache file: Redis losing the list, or being away, revokes nothing back.
    """

    def __init__(self, url: str, cache: Path) -> None:
        self._url = url
        self._cache = cache
        self._known = read_cache(cache)
        self._conn: redis.Redis | None = None
        self._failing = False

    def known(self) -> frozenset[str]:
        """Every key id known to be revoked."""
        return self._known

    def poll(self) -> bool:
        """Read the list from Redis; True when it names a key not known to be revoked before."""
        try:
            kids = decode(self._connection().get(c.revoked_keys_key()))
        except (redis.RedisError, OSError, ValueError) as exc:
            if not self._failing:  # one line per outage, not one per poll
                log.warning("revocation list not read from Redis, keeping the %d known: %s", len(self._known), exc)
                self._failing = True
            return False
        self._failing = False
        new = kids - self._known
        if not new:
            return False
        self._known = self._known | new
        log.warning("keys revoked on the hub: %s", ", ".join(sorted(new)))
        try:
            write_atomic(self._cache, encode(self._known), mode=0o600, durable=True)
        except OSError as exc:
            log.warning("revocations not kept in %s: %s", self._cache, exc.strerror)
        return True

    def _connection(self) -> redis.Redis:
        if self._conn is None:
            from xnai_tasks.core import broker

            self._conn = broker.connect(self._url, timeout=READ_TIMEOUT_S, retries=0)
        return self._conn


def feed_for(home: Path) -> RevocationFeed | None:
    """The feed of a home joined to a hub (any role's credential reads the list); None for any other home."""
    from xnai_tasks.security.joined_host import read_joined

    joined = read_joined(home)
    if joined is None:
        return None
    return RevocationFeed(joined.url(joined.roles[0]), cache_path(home))
