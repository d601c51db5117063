"""``xnai host``: credentials for the hosts of a hub (bundle, join) and the revocation list they read (publish)."""

from __future__ import annotations

from pathlib import Path

import click

from xnai_tasks.cli.parsing import Choice, Command
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


@click.command("host", cls=Command)
@click.argument("action", type=Choice("bundle", "join", "publish"))
@click.argument("words", nargs=-1)
@click.option("--url", default=None, help="bundle: the hub's Redis URL as the host reaches it, without credentials")
@click.option("-o", "--output", default=None, help="bundle: the file to write (default: xnai-host-ROLES.json)")
@click.option(
    "--host", "host_name", default=None, help="bundle: the host's name in its TLS client certificate (with a TLS CA)"
)
@click.pass_obj
def host_command(
    settings: Settings, action: str, words: tuple[str, ...], url: str | None, output: str | None, host_name: str | None
) -> int:
    """Credentials for a worker host of this hub.

    ACTION is one of: bundle ROLE... --url rediss://HUB:PORT/0 --host NAME [-o FILE] (on the hub: a file, mode
    0600, holding what a host running ROLE... needs and nothing else; --host is required when the hub has a TLS
    CA, and a plain redis:// URL must be loopback); join BUNDLE (on that host: install it into
    its XNAI_HOME, then `xnai worker ROLE` connects to the hub); publish (on the hub: send the revoked keys to
    Redis again, for the joined hosts; `xnai keys revoke` does it by itself with the embedded Redis).
    """
    if action == "bundle":
        return _bundle(settings, words, url, output, host_name)
    if action == "join":
        return _join(settings, words)
    return _publish(settings)


def _bundle(settings: Settings, roles: tuple[str, ...], url: str | None, output: str | None, host: str | None) -> int:
    from xnai_tasks.security.bundle import make_bundle, write_bundle
    from xnai_tasks.security.password_file import ensure_passwords

    if url is None:
        raise UsageError("xnai host bundle ROLE... needs --url, the hub's Redis URL as the host reaches it")
    if settings.joined_roles:
        raise UsageError(f"{settings.home} is a joined host, not a hub: make bundles on the hub")
    bundle = make_bundle(settings.home, ensure_passwords(settings.home), roles, url, host=host)
    path = Path(output or f"xnai-host-{'-'.join(r.role for r in bundle.roles)}.json")
    digest = write_bundle(path, bundle)
    _publish_quietly(settings)
    parts = ", ".join(r.role for r in bundle.roles) + (" + TLS" if bundle.tls else "")
    print(f"bundle {path} (mode 0600) for {parts}; sha256 {digest}")
    return 0


def _join(settings: Settings, words: tuple[str, ...]) -> int:
    from xnai_tasks.security.bundle import join, read_bundle

    if len(words) != 1:
        raise UsageError("usage: xnai host join BUNDLE")
    path = Path(words[0])
    bundle = read_bundle(path)
    joined = join(settings.home, bundle)
    print(f"joined {joined.hub} as {', '.join(joined.roles)} in {settings.home}; bundle sha256 {bundle.digest()}")
    return 0


def _publish(settings: Settings) -> int:
    from xnai_tasks.security.revocation_list import revoked_in_keyring

    if settings.joined_roles:
        raise UsageError(f"{settings.home} is a joined host: only the hub's admin may publish revocations")
    problem = _publish_revocations(settings)
    if problem is not None:
        raise UsageError(f"revocations not published: {problem}")
    print(f"published {len(revoked_in_keyring(settings.home))} revoked keys")
    return 0


def _publish_quietly(settings: Settings) -> None:
    """A bundle is a moment to make sure Redis has the list its host will read."""
    import logging

    problem = _publish_revocations(settings)
    if problem is not None:
        logging.getLogger(__name__).info("revocations not published now: %s", problem)


def _publish_revocations(settings: Settings) -> str | None:
    """Publish this hub's revoked keys to its Redis as admin; None when done, else why not."""
    from xnai_tasks.security import acl, redis_urls
    from xnai_tasks.security.revocation_list import publish_from_home

    return publish_from_home(settings.home, redis_urls.connection_url(settings, acl.ADMIN))
