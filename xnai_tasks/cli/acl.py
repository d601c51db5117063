"""``xnai acl``: the Redis ACL rules of the roles, and unlocking a role the memory guard locked out."""

from __future__ import annotations

import click

from xnai_tasks.cli.parsing import Choice, Command
from xnai_tasks.cli.roles import role_name
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


@click.command("acl", cls=Command)
@click.argument("action", type=Choice("render", "unlock"))
@click.argument("role", required=False)
@click.option("--hashes", is_flag=True, help="fill in the SHA-256 hashes of this home's passwords")
@click.option("--redis-version", default="7.0", help="render for this Redis version (6.2 has no %R~/%W~)")
@click.pass_obj
def acl_command(settings: Settings, action: str, role: str | None, hashes: bool, redis_version: str) -> int:
    """Redis ACL users of the roles.

    ACTION is render (print the rules) or unlock ROLE (let a role the memory guard locked out connect again).
    """
    from xnai_tasks.security import acl, password_file, redis_urls

    if action == "unlock":
        from xnai_tasks.ops.memory_guard import unlock

        name = role_name(role or "")
        was = unlock(settings, name)
        print(f"unlocked {name}" + (f" (it was locked: {was})" if was else " (it was not locked)"))
        return 0
    passwords = password_file.ensure_passwords(settings.home) if hashes else None
    try:
        major, minor = (int(part) for part in redis_version.split(".")[:2])
    except ValueError:
        raise UsageError(f"--redis-version {redis_version!r} is not MAJOR.MINOR") from None
    print(acl.render_acl(passwords, db=redis_urls.url_db(settings.broker_url), server_version=(major, minor)), end="")
    return 0
