"""The copilot's resource decisions on a real stack: it warms a scheduled workflow's roles before the run, unloads
idle lazy models when RAM is short (forced by XNAI_MIN_FREE_MB), refuses the unload from anyone else, and beat
runs the scheduled workflow end to end.

One private stack (embedded Redis, a worker per role, the copilot with beat every 5 s, lazy models, one process per
model role) serves every test, in the order written: the first scheduled run is due 60 s after beat starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import admin_connection, lazy_settings, run_xnai, running_stack
from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.core.nodes import workers_online
from xnai_tasks.ops.resources import Due, decide
from xnai_tasks.security import redis_urls
from xnai_tasks.security.keyring import SignerSource
from xnai_tasks.security.publish import signing_as
from xnai_tasks.settings import Settings
from xnai_tasks.worker.model_control import RELEASE_COMMAND
from xnai_tasks.workflow.schedule import parse_schedule

pytestmark = pytest.mark.slow

REVIEW = {"options": ["redis", "sqlite"], "question": "which store?", "k": 1, "max_tokens": 4}
EVERY_S = 60
WAIT_S = 240


@pytest.fixture(scope="module")
def settings() -> Settings:
    schedule = {"quick": {"workflow": "review", "kwargs": REVIEW, "every_s": EVERY_S}}
    return lazy_settings(
        schedule=parse_schedule(json.dumps(schedule)),
        copilot_every_s=5,
        min_free_mb=1 << 24,  # 16 TiB: RAM is always short
        preload_ahead_s=90,
        plan_overrides=json.dumps({role: {"processes": 1} for role in ("cline", "grok", "curation")}),
    )


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Any]:
    with running_stack(settings, ("copilot", "cline", "grok", "curation")) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Any, settings: Settings) -> Iterator[Client]:
    made = Client(settings)
    yield made
    made.close()


@pytest.fixture(scope="module")
def admin(stack: Any, settings: Settings) -> Iterator[redis.Redis]:
    with admin_connection(settings) as conn:
        yield conn


def until(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


def models(client: Client, role: str) -> list[dict[str, Any]]:
    health: dict[str, Any] = client.submit(role, "health").get(timeout=120)
    return list(health["models"])


def loaded(client: Client, role: str) -> bool:
    return any(m["loaded"] for m in models(client, role))


def decisions(settings: Settings, action: str) -> list[dict[str, Any]]:
    done = run_xnai(["status", "--json"], settings)
    assert done.returncode == 0, done.stderr
    found: list[dict[str, Any]] = json.loads(done.stdout)["copilot"]["decisions"]
    return [d for d in found if d["action"] == action]


def runs(settings: Settings) -> list[dict[str, Any]]:
    done = run_xnai(["runs", "--json"], settings)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_decide_keeps_the_models_of_queued_and_scheduled_roles() -> None:
    # Given RAM under the floor, work queued for grok and a review workflow due in 10 s
    settings = Settings(home=Path("/nonexistent"), min_free_mb=1024, preload_ahead_s=60)
    due = [Due("quick", "review", 10.0, 110.0)]
    # When the copilot decides
    got = decide(settings, available_bytes=100 << 20, queued={"grok": 3}, due=due, now=100.0)
    # Then it warms the review's roles and unloads only cline's idle models, saying why
    assert [(d.action, d.roles) for d in got] == [("preload", ("grok", "curation")), ("release", ("cline",))]
    assert "100 MiB < XNAI_MIN_FREE_MB 1024 MiB" in got[1].reason
    # and with RAM to spare and the run already warmed for, it does nothing
    warmed = [Due("quick", "review", 10.0, 110.0, warmed=True)]
    assert decide(settings, available_bytes=4096 << 20, queued={}, due=warmed, now=100.0) == []


def test_a_scheduled_workflows_roles_are_warmed_before_it_runs(
    stack: Any, settings: Settings, client: Client, admin: redis.Redis
) -> None:
    # Given a review workflow scheduled every 60 s on a stack whose lazy models load on first use
    # When the copilot's beat ticks before the first run is due
    until(lambda: loaded(client, "grok") and loaded(client, "curation"), "grok and curation to be warmed")
    # Then grok and curation hold their models while no run has started yet
    assert runs(settings) == []
    (preload,) = decisions(settings, "preload")
    assert preload["roles"] == ["grok", "curation"] and "scheduled workflow review (quick)" in preload["reason"]


def test_a_release_signed_by_another_role_is_refused(
    stack: Any, settings: Settings, client: Client, admin: redis.Redis
) -> None:
    # Given grok's warm model (kept: its scheduled run is due) and cline's credential and key
    until(lambda: loaded(client, "grok"), "grok to be warm")
    before = int(admin.hget(c.refused_counter_key("grok"), "control_not_authorized") or 0)
    copilot = create_app(settings, main="xnai_test_copilot_view")
    try:
        node = until(lambda: workers_online(copilot).get("grok"), "grok to answer the copilot")[0]
    finally:
        copilot.close()
    url = redis_urls.connection_url(settings, "cline")
    hostile = create_app(Settings(home=settings.home, redis_url=url), main="xnai_test_hostile_release")
    hostile.conf.xnai_control_agent = None
    try:
        # When cline broadcasts the release command to grok, signed with its own key
        with signing_as(SignerSource(settings.home, "cline")):
            hostile.control.broadcast(RELEASE_COMMAND, destination=[node])
    finally:
        hostile.close()
    # Then grok refuses it, says why, and its model stays loaded
    until(
        lambda: int(admin.hget(c.refused_counter_key("grok"), "control_not_authorized") or 0) > before,
        "grok to count the refusal",
    )
    assert loaded(client, "grok")
    assert admin.llen(c.dead_letter_key("grok")) >= 1


def test_low_ram_unloads_an_idle_lazy_model(stack: Any, settings: Settings, client: Client) -> None:
    # Given cline's lazy LLM loaded by a task (cline has no scheduled run, keep_alive is 300 s)
    client.submit("cline", "generate_docs", topic="ram", max_tokens=2, cache="off").get(timeout=180)
    # When RAM is short (XNAI_MIN_FREE_MB above any host's RAM) and the copilot's beat ticks
    after = until(lambda: (lambda ms: ms if not any(m["loaded"] for m in ms) else None)(models(client, "cline")),
                  "cline to unload its model")  # fmt: skip
    # Then cline's process unloaded the model it had loaded, and the decision and its reason are in xnai status
    assert any(m["loads"] >= 1 for m in after)
    release = [d for d in decisions(settings, "release") if "cline" in d["roles"]]
    assert release and "XNAI_MIN_FREE_MB" in release[0]["reason"] and "acknowledged" in release[0]["detail"]


def test_beat_runs_a_scheduled_workflow_end_to_end(stack: Any, settings: Settings) -> None:
    # Given the review workflow in XNAI_SCHEDULE
    # When beat's first run of it is due and finishes
    done = until(lambda: [r for r in runs(settings) if r["state"] != "running"], "a scheduled run to finish")
    # Then xnai runs lists it, succeeded
    assert done[0]["workflow"] == "review" and done[0]["state"] == "succeeded", done[0]
