"""A missing or unknown task argument is refused at submit (exit 2, naming the task's parameters), never enqueued.

Real processes: the embedded Redis with keys and ACLs and no worker, so a queue's depth moves only by what a
submit enqueues; ``xnai submit`` runs as a subprocess.
"""

from __future__ import annotations

import pytest

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import UsageError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import run_xnai, short_home


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return Settings(home=short_home())


def depths(stack: Stack) -> dict[str, int]:
    """The depth of every role's queue, read as admin."""
    assert stack.redis is not None
    conn = stack.redis.client()
    try:
        return {role: broker.queue_depth(conn, c.queue_for(role)) for role in c.ROLES}
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("role", "task", "kwargs", "message"),
    [
        (
            "grok",
            "echo",
            '{"value": 1, "foo": 2}',
            "xnai: grok.echo takes value=..., delay_s=..., retries=...: unknown argument foo",
        ),
        ("cline", "health", '{"bogus": 1}', "xnai: cline.health takes no arguments: unknown argument bogus"),
        # a key that is no Python name is quoted: the message stays one line
        ("cline", "health", '{"a\\nb": 1}', "xnai: cline.health takes no arguments: unknown argument 'a\\nb'"),
        (
            "curation",
            "classify",
            '{"text": "x", "limit": 3, "top": 1}',
            "xnai: curation.classify takes text, labels: missing labels; unknown arguments limit, top",
        ),
    ],
)
def test_cli_refuses_a_bad_argument_with_exit_2_and_enqueues_nothing(
    private_stack: Stack, private_settings: Settings, role: str, task: str, kwargs: str, message: str
) -> None:
    # Given the queues' depths (no worker consumes them)
    before = depths(private_stack)
    # When a task is submitted with a missing or an unknown argument
    done = run_xnai(["submit", role, task, "--kwargs", kwargs], private_settings, timeout=60)
    # Then it exits 2 with one line naming the task's parameters and what is wrong
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.splitlines() == [message], done.stderr
    assert done.stdout == ""
    # And nothing was enqueued
    assert depths(private_stack) == before


def test_cli_names_a_missing_required_argument(private_stack: Stack, private_settings: Settings) -> None:
    # Given grok.synthesize, whose prompt is required
    before = depths(private_stack)
    # When it is submitted without one
    done = run_xnai(["submit", "grok", "synthesize", "--kwargs", '{"max_tokens": 8}'], private_settings, timeout=60)
    # Then one line lists its parameters, required ones bare, and says what is missing
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("xnai: grok.synthesize takes prompt, ") and "max_tokens=..." in line, line
    assert line.endswith(": missing prompt"), line
    assert depths(private_stack) == before


def test_client_refuses_a_bad_argument_before_sending(private_stack: Stack, private_client: Client) -> None:
    # Given the queues' depths
    before = depths(private_stack)
    # When the Python client submits a task without its required argument, or with one it does not take
    with pytest.raises(UsageError) as missing:
        private_client.submit("curation", "search", k=3)
    with pytest.raises(UsageError) as unknown:
        private_client.submit("curation", "search", query="redis", limit=3)
    # Then each is a usage error (exit 2) naming the parameters, and nothing was enqueued
    assert str(missing.value) == "curation.search takes query, k=...: missing query"
    assert str(unknown.value) == "curation.search takes query, k=...: unknown argument limit"
    assert missing.value.exit_code == 2
    assert depths(private_stack) == before


def test_a_good_submit_is_counted_by_the_same_measure(private_stack: Stack, private_client: Client) -> None:
    # Given the queues' depths
    before = depths(private_stack)
    # When a task is submitted with arguments that fit (the defaults may be left out)
    private_client.submit("curation", "search", query="redis")
    # Then it is enqueued: the depth the refusals above leave unchanged does move for a real submit
    assert depths(private_stack) == {**before, "curation": before["curation"] + 1}
