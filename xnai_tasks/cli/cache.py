"""``xnai cache``: the response cache's commands (match, stats, clear, forget; eval: the semantic guard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from xnai_tasks.cli.parsing import Choice, Command
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings

ACTIONS = ("match", "stats", "clear", "forget", "eval")


@click.command("cache", cls=Command)
@click.argument("action", type=Choice(*ACTIONS))
@click.argument("words", nargs=-1)
@click.option("--kwargs", default="{}", help="match: the task's keyword arguments as a JSON object")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_obj
def cache_command(settings: Settings, action: str, words: tuple[str, ...], kwargs: str, as_json: bool) -> int:
    """The response cache.

    ACTION is one of: match ROLE TASK --kwargs JSON (would the cache answer this request? nothing runs);
    stats (entries, bytes and counts per role); clear [ROLE] (drop the cache of one role or all); forget
    KEY (drop one entry); eval [FILE] (the semantic guard's decision on each pair of a JSON-lines file of
    {"a", "b", "same"}; default: the development pairs shipped with xnai-tasks).
    """
    if action == "eval":
        return _eval(settings, words, as_json)
    from xnai_tasks.cache import admin

    if action == "match":
        if len(words) != 2:
            raise UsageError("xnai cache match takes ROLE TASK (and --kwargs JSON)")
        from xnai_tasks.cli.tasks import json_object

        found: Any = admin.match(settings, words[0], words[1], json_object(kwargs))
        print(json.dumps(found) if as_json else admin.format_match(found))
    elif action == "stats":
        rows = admin.stats(settings)
        print(json.dumps(rows) if as_json else admin.format_stats(rows))
    elif action == "clear":
        gone = admin.clear(settings, words[0] if words else None)
        print(json.dumps({"deleted_keys": gone}) if as_json else f"cleared: {gone} keys")
    else:
        if len(words) != 1:
            raise UsageError("xnai cache forget takes KEY (a cache key, as xnai cache match prints it)")
        role = admin.forget(settings, words[0])
        print(json.dumps({"forgotten": role is not None, "role": role}) if as_json else _forgot(words[0], role))
    return 0


def _forgot(key: str, role: str | None) -> str:
    return f"forgot {key} ({role})" if role else f"{key}: not cached"


def _eval(settings: Settings, words: tuple[str, ...], as_json: bool) -> int:
    from xnai_tasks.cache.evaluation import DEFAULT_PAIRS, format_eval, run_eval

    report = run_eval(settings, Path(words[0]) if words else DEFAULT_PAIRS)
    print(json.dumps(report) if as_json else format_eval(report))
    return 0
