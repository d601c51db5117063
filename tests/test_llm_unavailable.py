"""Role workers whose LLM probe fails: the safe options serve, or the LLM is out and says why.

Real worker processes and the real default models; the probe runs a stand-in runner from
``tests/probe_runners`` (``XNAI_LLM_PROBE_RUNNER``) that crashes the way llama.cpp does on a CPU whose
AMX the VM does not allow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from xnai_tasks.bench.harness import role_worker
from xnai_tasks.client.sync import Client
from xnai_tasks.errors import RefusedError
from xnai_tasks.observability.status import collect_status, format_status
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import run_xnai, short_home

pytestmark = pytest.mark.slow

TESTS_DIR = str(Path(__file__).resolve().parent)
CONTEXT = (
    "SQLite stores a whole database in one file and needs no server. "
    "PostgreSQL runs as a server process that clients connect to over a socket. "
    "Bananas are yellow."
)


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return Settings(home=short_home(), model_mode="lazy")


@pytest.fixture(scope="module")
def settings(private_stack: Stack, private_settings: Settings) -> Settings:
    return private_settings


@pytest.fixture(scope="module")
def app(private_app: Celery) -> Celery:
    return private_app


@pytest.fixture(scope="module")
def client(private_client: Client) -> Client:
    return private_client


def runner_env(runner: str) -> dict[str, str]:
    return {"PYTHONPATH": TESTS_DIR, "XNAI_LLM_PROBE_RUNNER": f"probe_runners.{runner}"}


def llm_of(health: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in health["models"] if m["kind"] == "gguf")


def test_a_probe_that_crashes_with_the_defaults_serves_with_the_safe_options(
    settings: Settings, app: Celery, client: Client
) -> None:
    # Given a cline worker whose probe dies by SIGILL unless weight repacking is off
    with role_worker(settings, app, "cline", concurrency=1, env=runner_env("crash_unless_safe")):
        # When it is asked for documentation
        docs = client.submit("cline", "generate_docs", topic="a Redis list", max_tokens=24, seed=1).get(timeout=180)
        health = client.submit("cline", "health").get(timeout=60)
    # Then it answers with real text, and health says which options the model was loaded with, and why
    assert docs["completion_tokens"] > 0 and docs["text"].strip()
    model = llm_of(health)
    assert model["load_options"] == {"use_extra_bufts": False}
    assert model["probe"]["status"] == "safe" and "died by SIGILL" in model["probe"]["reason"]
    assert model["unavailable"] is None


def test_a_model_that_cannot_run_degrades_grok_and_makes_cline_refuse(
    settings: Settings, app: Celery, client: Client
) -> None:
    # Given cline and grok workers whose LLM probe dies with every set of options
    env = runner_env("always_crash")
    with (
        role_worker(settings, app, "cline", concurrency=1, env=env),
        role_worker(settings, app, "grok", concurrency=1, env=env),
    ):
        # When cline is asked for documentation, it refuses at once with the reason (CLI: exit 3, one line)
        with pytest.raises(RefusedError, match="cannot run on this host: default options: died by SIGILL"):
            client.submit("cline", "generate_docs", topic="a Redis list").get(timeout=60)
        done = run_xnai(
            ["submit", "cline", "generate_docs", "--kwargs", '{"topic": "a Redis list"}', "--wait", "--timeout", "60"],
            settings,
        )
        assert done.returncode == 3, done.stderr
        assert "cannot run on this host" in done.stderr and done.stderr.count("\n") == 1
        # And grok answers from its encoder, marked degraded with the same reason
        answer = client.submit("grok", "synthesize", prompt="Which database needs no server?", context=CONTEXT).get(
            timeout=180
        )
        assert answer["degraded"] is True and "died by SIGILL" in answer["degraded_reason"]
        assert "SQLite" in answer["text"]
        # And both workers still serve their other tasks, and health and status say why
        cline_health = client.submit("cline", "health").get(timeout=60)
        grok_health = client.submit("grok", "health").get(timeout=60)
        status = collect_status(settings)
    for health in (cline_health, grok_health):
        assert "cannot run on this host" in llm_of(health)["unavailable"]
    for role in ("cline", "grok"):
        (model,) = [m for m in status["roles"][role]["models"].values() if m["kind"] == "gguf"]
        assert model["probe"]["status"] == "unavailable"
    text = format_status(status)
    assert "(cline): UNAVAILABLE: cannot run on this host" in text
    assert "(grok): UNAVAILABLE: cannot run on this host" in text
