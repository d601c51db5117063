"""Flower's task formatting hook: args, kwargs and result as JSON, long texts cut at 2,000 characters."""

from __future__ import annotations

import json
from typing import Any

from celery import states
from celery.events.state import Task
from celery.utils.saferepr import saferepr

import celeryconfig
from xnai_tasks.ops.flower_tasks import TEXT_LIMIT, cut_text, repr_as_json, task_formatter

#: How deep Celery writes out task arguments in events with our settings.
ARG_LEVELS = celeryconfig.RELIABILITY["task_repr_maxlevels"]


def _event_task(args: Any, kwargs: Any, result: Any) -> Task:
    """A task as Flower holds it: Celery's event texts of its arguments (our settings) and result (Celery's)."""
    return Task(
        uuid="0b6c6a3e-1d1e-4c0e-9a51-3f0e1f1c2a10",
        name="grok.echo",
        state=states.SUCCESS,
        args=saferepr(args, 1024, maxlevels=ARG_LEVELS),
        kwargs=saferepr(kwargs, 1024, maxlevels=ARG_LEVELS),
        result=saferepr(result, 1024),
    )


def test_the_hook_shows_args_kwargs_and_result_as_json() -> None:
    # Given a task whose arguments nest 5 levels and hold quotes, a newline, a backslash and non-ASCII text
    kwargs = {
        "doc": {"title": 'it\'s "quoted"', "body": "line 1\nline 2 \\ é ☃", "meta": {"a": {"b": {"c": [1, 2.5]}}}},
        "flags": [True, False, None],
    }
    result = {"hits": [{"id": "d1", "score": 0.75}], "count": 1}
    task = _event_task((42, "x"), kwargs, result)
    assert task.kwargs.startswith("{'doc'")  # what Flower showed before: a Python repr
    # When Flower's format_task hook formats it
    shown = task_formatter(app=None)(task)
    # Then args, kwargs and result are indented JSON holding exactly the values
    assert json.loads(shown.args) == [42, "x"]
    assert json.loads(shown.kwargs) == kwargs
    assert json.loads(shown.result) == result
    assert shown.kwargs == json.dumps(kwargs, indent=2, ensure_ascii=False)


def test_long_texts_are_cut_at_2000_characters_saying_how_many_were_left_out() -> None:
    # Given a text of 2,500 characters
    text = "é" * 2500
    # When it is shown, Then its first 2,000 characters are, followed by the count of those cut
    assert TEXT_LIMIT == 2000
    assert cut_text(text) == "é" * 2000 + "…[500 more characters]"
    assert cut_text("é" * 2000) == "é" * 2000
    # And a text inside a value is cut the same way
    assert json.loads(repr_as_json(saferepr({"t": "a" * 1500, "n": 3}, 4096))) == {"t": "a" * 1500, "n": 3}
    shown = json.loads(repr_as_json(repr({"t": "a" * 2001})))
    assert shown == {"t": "a" * 2000 + "…[1 more characters]"}


def test_what_celery_left_out_of_a_repr_shows_as_an_ellipsis() -> None:
    # Given reprs Celery cut: nested past its default 3 levels, and a list past 1,024 characters
    deep = saferepr({"a": {"b": {"c": {"d": 1}}}}, 1024)
    long_list = saferepr(list(range(1000)), 1024)
    # When they are shown, Then what Celery left out is "…", the rest JSON
    assert json.loads(repr_as_json(deep)) == {"a": {"b": {"c": "…"}}}
    shown = json.loads(repr_as_json(long_list))
    assert shown[:3] == [0, 1, 2] and shown[-1] == "…"


def test_a_repr_of_something_that_is_not_json_data_is_left_as_it_is() -> None:
    # Given reprs of objects that are not JSON data (another producer's task), When shown, Then unchanged
    for text in ("<object object at 0x7f>", "datetime.datetime(2024, 1, 1, 0, 0)", "{'a': 1", "b'bytes'"):
        assert repr_as_json(text) == text
    assert repr_as_json(None) is None
