"""How Flower shows a task: args, kwargs and result as indented JSON, texts cut at :data:`TEXT_LIMIT`.

This is Flower's own hook (its ``format_task`` option, set by :func:`xnai_tasks.ops.flower.apply_flower_defaults`):
Flower calls it with a copy of each task it shows, on a task's page and in the tasks table. What Flower
holds are the texts Celery's events carry: ``saferepr`` strings of the arguments (cut by the sender at 1024
characters, nested levels beyond ``task_repr_maxlevels`` written ``[...]``) and of the result (cut at 1024
characters, nested levels beyond 3 written ``[...]``). They are read back here by a parser of that format
(literals only, nothing is evaluated) and written as JSON. A result that Celery cut is read instead from
the result store, where it is whole, once its signature checks (:func:`verify_result`, signed by the task's
role); anything Celery left out of the arguments shows as ``"…"``. Any text longer than :data:`TEXT_LIMIT`
characters is cut there, with the number of characters left out.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import states
from redis.exceptions import RedisError

from xnai_tasks.core import constants as c
from xnai_tasks.errors import ResultSignatureError
from xnai_tasks.security.keyring import shared_keyring
from xnai_tasks.security.result_signature import verify_result
from xnai_tasks.security.signature import SIG_HEADER

log = logging.getLogger(__name__)

#: Characters of one text (a string anywhere in args, kwargs or the result) that Flower shows; the rest is cut.
TEXT_LIMIT = 2000
#: What stands where Celery's repr left something out (it writes ``...``), and the mark of a cut text.
ELIDED = "…"
#: A result repr this long (Celery cuts at 1024) may have been cut: the whole result is read from the store.
REPR_CUT_AT = 1000
#: Results read from the store and formatted, kept per task id (a finished task's result does not change).
STORED_CACHE = 256

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_WORDS = {"True": True, "False": False, "None": None}
_CLOSERS = {"[": "]", "(": ")", "{": "}"}


class _Elided:
    """Where Celery's repr wrote ``...``: something left out."""


_ELIDED = _Elided()


class ReprSyntaxError(ValueError):
    """The text is not in the form Celery's ``saferepr`` gives plain JSON data."""


def cut_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}{ELIDED}[{len(text) - limit} more characters]"


def to_json(value: Any) -> str:
    """Indented JSON of ``value`` (JSON data, or what :func:`parse_repr` read), every text cut at TEXT_LIMIT."""
    return json.dumps(_shown(value), indent=2, ensure_ascii=False)


def _shown(value: Any) -> Any:
    if value is _ELIDED:
        return ELIDED
    if isinstance(value, str):
        return cut_text(value)
    if isinstance(value, list | tuple):
        return [_shown(item) for item in value]
    if isinstance(value, dict):
        return {ELIDED if k is _ELIDED else str(k): _shown(v) for k, v in value.items()}
    return value


def repr_as_json(text: Any) -> Any:
    """A repr of JSON data as indented JSON; anything else (not a text, not such a repr) as it is."""
    if not isinstance(text, str):
        return text
    try:
        return to_json(parse_repr(text))
    except ReprSyntaxError:
        return text


def parse_repr(text: str) -> Any:
    """Read back what Celery's ``saferepr`` wrote for JSON data (``...`` where it left something out)."""
    reader = _ReprReader(text)
    value = reader.value()
    reader.skip_spaces()
    if reader.pos != len(text):
        raise ReprSyntaxError(f"unexpected {text[reader.pos : reader.pos + 10]!r} at {reader.pos}")
    return value


def is_whole(value: Any) -> bool:
    """True when nothing of a parsed repr was left out by Celery."""
    if value is _ELIDED:
        return False
    if isinstance(value, list | tuple):
        return all(is_whole(item) for item in value)
    if isinstance(value, dict):
        return all(is_whole(k) and is_whole(v) for k, v in value.items())
    return True


class _ReprReader:
    """A reader of ``saferepr`` output: dicts, lists, tuples, sets, quoted texts, numbers, True/False/None, ``...``.

    ``saferepr`` quotes a text in single quotes and escapes only the single quotes in it (newlines and
    backslashes are written as they are), so ``ast.literal_eval`` cannot read it back; this can.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def value(self) -> Any:
        self.skip_spaces()
        text, pos = self.text, self.pos
        if text.startswith("...", pos):
            self.pos += 3
            return _ELIDED
        char = text[pos : pos + 1]
        if char in _CLOSERS:
            return self._container(char)
        if char == "'":
            return self._quoted()
        for word, meaning in _WORDS.items():
            if text.startswith(word, pos):
                self.pos += len(word)
                return meaning
        number = _NUMBER.match(text, pos)
        if number is None:
            raise ReprSyntaxError(f"unexpected {text[pos : pos + 10]!r} at {pos}")
        self.pos = number.end()
        if text.startswith("...", self.pos):  # a number Celery cut short
            self.pos += 3
            return _ELIDED
        found = number.group()
        return float(found) if any(ch in found for ch in ".eE") else int(found)

    def _quoted(self) -> str:
        text, pos, out = self.text, self.pos + 1, []
        while pos < len(text):
            if text.startswith("\\'", pos):
                out.append("'")
                pos += 2
            elif text[pos] == "'":
                self.pos = pos + 1
                return "".join(out)
            else:
                out.append(text[pos])
                pos += 1
        raise ReprSyntaxError("a quoted text is not closed")

    def _container(self, opener: str) -> Any:
        closer = _CLOSERS[opener]
        self.pos += 1
        items: list[Any] = []
        pairs: dict[Any, Any] = {}
        while True:
            self.skip_spaces()
            if self.text.startswith(closer, self.pos):
                self.pos += 1
                break
            if self.text.startswith(",", self.pos):  # between items, after a 1-tuple's item, before ', ...'
                self.pos += 1
                continue
            if self.pos >= len(self.text):
                raise ReprSyntaxError(f"{opener!r} is not closed")
            item = self.value()
            self.skip_spaces()
            if opener == "{" and self.text.startswith(":", self.pos):
                self.pos += 1
                pairs[_hashable(item)] = self.value()
            elif opener == "{" and item is _ELIDED:
                pairs[_ELIDED] = _ELIDED
            else:
                items.append(item)
        if opener != "{":
            return items
        if pairs and items:
            raise ReprSyntaxError("a dict with items that are not key: value")
        if list(pairs) == [_ELIDED]:
            return _ELIDED  # '{...}': a dict Celery did not write out at all
        return pairs or items or {}


def _hashable(key: Any) -> Any:
    if isinstance(key, list | dict):
        raise ReprSyntaxError("a dict key that is a container")
    return key


class _StoredResults:
    """Whole results of finished tasks, read from the result store with Flower's ACL user and checked."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.formatted: OrderedDict[str, str] = OrderedDict()

    def json_for(self, task: Any) -> str | None:
        """The stored result of ``task`` as JSON, when it succeeded and its event's repr may be incomplete."""
        shown = task.result
        if task.state != states.SUCCESS or not isinstance(shown, str) or _complete_repr(shown):
            return None
        uuid = str(task.uuid)
        if uuid in self.formatted:
            self.formatted.move_to_end(uuid)
            return self.formatted[uuid]
        result = self._read(uuid, c.role_of_task(str(task.name or "")))
        if result is None:
            return None
        formatted = self.formatted[uuid] = to_json(result[0])
        while len(self.formatted) > STORED_CACHE:
            self.formatted.popitem(last=False)
        return formatted

    def _read(self, task_id: str, role: str) -> tuple[Any] | None:
        if role not in c.ROLES:
            return None
        try:
            raw = self.app.backend.client.get(c.result_key(role, task_id))
            if raw is None:
                return None
            meta = json.loads(raw)
            verify_result(
                shared_keyring(Path(str(self.app.conf["xnai_home"]))),
                task_id=task_id,
                status=meta.get("status"),
                result=meta.get("result"),
                signature=meta.get(SIG_HEADER),
                agent=role,
            )
        except (RedisError, ValueError, ResultSignatureError) as exc:
            log.warning("Flower shows the event's result of task %s: the stored one is unusable: %s", task_id, exc)
            return None
        if meta.get("status") != states.SUCCESS:
            return None
        return (meta.get("result"),)


def _complete_repr(text: str) -> bool:
    """True when a result's repr holds the whole result (it parses, Celery left nothing out nor cut it)."""
    if len(text) >= REPR_CUT_AT:
        return False
    try:
        return is_whole(parse_repr(text))
    except ReprSyntaxError:
        return True  # not JSON data: the store would not read better


def task_formatter(app: Any) -> Callable[[Any], Any]:
    """Flower's ``format_task`` hook for ``app``'s tasks (a plain function: Flower's option takes no other)."""
    stored = _StoredResults(app)

    def format_task(task: Any) -> Any:
        """Args, kwargs and result of a copy of a Flower task as JSON (see the module's docstring)."""
        task.args = repr_as_json(task.args)
        task.kwargs = repr_as_json(task.kwargs)
        task.result = stored.json_for(task) or repr_as_json(task.result)
        return task

    return format_task
