"""``xnai keys``: the Ed25519 keyring and who may dispatch what."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from xnai_tasks.cli.parsing import Choice, Command, Number
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


@click.command("keys", cls=Command)
@click.argument("action", type=Choice("init", "list", "rotate", "authorize", "revoke"))
@click.argument("args", nargs=-1)
@click.option("--grace", type=Number(float), default=86400.0, help="rotate: seconds the old key stays valid")
@click.option("--replace", is_flag=True, help="authorize: replace the permissions instead of adding")
@click.option("--json", "as_json", is_flag=True, help="list: JSON")
@click.pass_obj
def keys_command(
    settings: Settings, action: str, args: tuple[str, ...], grace: float, replace: bool, as_json: bool
) -> int:
    """Manage the Ed25519 keys and who may dispatch what.

    ACTION is init, list, rotate AGENT, authorize AGENT PATTERN... or revoke KID.
    """
    from xnai_tasks.security import key_admin, key_store

    home = settings.home
    if action == "init":
        keyring = key_admin.init_keys(home)
        print(f"keyring at {key_store.keyring_path(home)}: agents {', '.join(keyring.agents())}")
    elif action == "list":
        rows = key_admin.list_keys(home)
        print(json.dumps(rows) if as_json else format_keys(rows))
    elif action == "rotate":
        entry = key_admin.rotate(home, _one(args, "rotate AGENT"), grace_s=grace)
        print(f"{entry.agent}: new key {entry.kid}; older keys stay valid for {grace:.0f} s")
    elif action == "authorize":
        if len(args) < 2:
            raise UsageError(
                "usage: xnai keys authorize AGENT PATTERN [PATTERN...] (patterns like cline.* or grok.synthesize)"
            )
        patterns = key_admin.authorize(home, args[0], args[1:], replace=replace)
        print(f"{args[0]} may dispatch: {', '.join(patterns)}")
    else:  # revoke
        # an external Redis: published with the configured URL (an admin's, on the hub); embedded: its admin
        admin_url = None if settings.embedded or settings.joined_roles else settings.broker_url
        entry = key_admin.revoke(home, _one(args, "revoke KID"), admin_url=admin_url)
        print(f"revoked {entry.kid} of {entry.agent}")
    return 0


def format_keys(rows: list[dict[str, Any]]) -> str:
    """The keys as a table: agent, key id, age, status, permissions."""
    lines = [f"{'agent':10}{'key id':18}{'age':>9}  {'status':8}permissions"]
    for row in rows:
        age = f"{row['age_s'] / 86400:.1f}d" if row["age_s"] >= 86400 else f"{row['age_s'] / 3600:.1f}h"
        lines.append(f"{row['agent']:10}{row['kid']:18}{age:>9}  {row['status']:8}{', '.join(row['permissions'])}")
    return "\n".join(lines)


def _one(values: Sequence[str], usage: str) -> str:
    if len(values) != 1:
        raise UsageError(f"usage: xnai keys {usage}")
    return values[0]
