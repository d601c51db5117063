"""Prompt reuse on the real default LLM: same answers with and without the cache, a bound it keeps, made per process.

The model tests load Gemma 3 270M once in this process; the worker test runs a preloading cline worker
(one pool child) on a private Redis, so the cache it reports was made after the fork.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from celery import Celery

from xnai_tasks.client.sync import Client
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import SettingsError
from xnai_tasks.models.inference import generate
from xnai_tasks.models.loading import LLM, load_llm
from xnai_tasks.models.model_file import resolve_model
from xnai_tasks.models.probe import probe_llm
from xnai_tasks.models.prompt_cache import MiB, PromptCache, attach, current, use_cache
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings
from xnai_tasks.worker import prompts

from support import free_port, run_xnai, short_home

pytestmark = pytest.mark.slow

NOTES = "Notes: A task that fails with a transient error is retried with backoff and jitter."
QUESTION = "Using the notes, explain retries in one short paragraph."
CODE_SPEC = "# A function that adds two numbers, in python.\n```python\n"


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    settings = Settings(home=short_home())
    gguf = resolve_model("gguf", settings)
    options = probe_llm(settings, gguf, 2).options
    assert options is not None
    yield load_llm(gguf.path, int(gguf.params["n_ctx"]), 2, params=gguf.params, options=options)
    shutil.rmtree(settings.home, ignore_errors=True)


def docs(llm: LLM, question: str = QUESTION, seed: int = 11, tokens: int = 24) -> str:
    return generate(llm, question, tokens, 0.7, seed=seed, system=NOTES, preamble=prompts.DOCS)["text"]


def code(llm: LLM) -> None:
    generate(llm, CODE_SPEC, 4, 0.2, seed=3, raw=True, preamble=prompts.CODE)


def test_same_answer_with_and_without_the_cache(llm: LLM) -> None:
    # Given a docs prompt and a seed answered with no prompt cache, after another template
    use_cache(llm, None)
    code(llm)
    without = docs(llm)
    code(llm)
    # When the cache holds the docs instructions, and a code prompt ran in between (only the cache has them)
    cache = attach(llm, 16 * MiB)
    assert cache is not None
    docs(llm, "Using the notes, explain backoff in one short paragraph.", seed=2, tokens=4)
    code(llm)
    restored = docs(llm)
    # And once more, straight after (the context still holds them)
    held = docs(llm)
    # Then the answer is the same every way, and the instructions were restored or kept, not evaluated again
    assert restored == without == held
    assert cache.counts == {"evaluated": 2, "restored": 1, "held": 1}
    use_cache(llm, None)


def test_the_cache_stays_within_its_bound(llm: LLM) -> None:
    # Given a 4 MiB cache (room for about two templates' states)
    cache = PromptCache(4 * MiB)
    use_cache(llm, cache)
    # When the four templates run in turn, twice
    for _ in range(2):
        for preamble in prompts.TEMPLATES.values():
            generate(llm, "Why?", 2, 0.7, seed=1, system=NOTES, preamble=preamble)
            # Then it never holds more than its bound
            assert cache.size_bytes <= cache.capacity_bytes
    report = cache.report()
    assert 1 <= report["entries"] < len(prompts.TEMPLATES) and report["bytes"] == cache.size_bytes
    # And a bound below one state keeps nothing, yet the answers still come
    tiny = PromptCache(1024)
    use_cache(llm, tiny)
    assert generate(llm, "Why?", 2, 0.7, seed=1, system=NOTES, preamble=prompts.DOCS)["completion_tokens"] > 0
    assert tiny.report()["entries"] == 0 and tiny.size_bytes == 0
    use_cache(llm, None)


def test_a_cache_from_another_process_is_not_used(llm: LLM) -> None:
    # Given this process's cache, marked as made by another process (what a fork would leave behind)
    inherited = attach(llm, 8 * MiB)
    assert inherited is not None
    inherited.pid = 1
    # When the model asks for its cache
    # Then the inherited one is not it, and the next attach makes a new one here
    assert current(llm) is None
    fresh = attach(llm, 8 * MiB)
    assert fresh is not None and fresh is not inherited
    # And 0 means no cache at all
    assert attach(llm, 0) is None and current(llm) is None


@pytest.mark.parametrize("raw", ["-1", "64MB", "1.5", "99999999", "lots"])
def test_nonsense_cache_sizes_are_refused(raw: str) -> None:
    # Given a nonsense XNAI_PROMPT_CACHE_MB
    # When the settings are read
    # Then they are refused, naming the variable
    with pytest.raises(SettingsError, match="XNAI_PROMPT_CACHE_MB"):
        Settings.from_env({"XNAI_PROMPT_CACHE_MB": raw, "XNAI_HOME": "/tmp"})


def test_zero_turns_it_off_and_the_default_is_on() -> None:
    assert Settings.from_env({"XNAI_PROMPT_CACHE_MB": "0", "XNAI_HOME": "/tmp"}).prompt_cache_mb == 0
    assert Settings.from_env({"XNAI_HOME": "/tmp"}).prompt_cache_mb == 64


def test_a_worker_refuses_to_start_with_a_nonsense_cache_size() -> None:
    home = short_home()
    try:
        # Given a fresh home and XNAI_PROMPT_CACHE_MB=-5
        # When a cline worker is started
        done = run_xnai(["worker", "cline"], env={"XNAI_HOME": str(home), "XNAI_PROMPT_CACHE_MB": "-5"}, timeout=60)
        # Then it exits 2 with one line naming the variable, and started nothing (no keys, no Redis)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "XNAI_PROMPT_CACHE_MB" in lines[0]
        assert list(home.iterdir()) == []
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- in a preloading worker's pool child


@pytest.fixture(scope="module")
def worker_settings() -> Iterator[Settings]:
    home = short_home()
    plan = '{"cline": {"processes": 1, "model_mode": "preload"}}'
    yield Settings(home=home, metrics_port=free_port(), plan_overrides=plan, prompt_cache_mb=8)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def cline(worker_settings: Settings) -> Iterator[tuple[Stack, Client]]:
    with Stack(worker_settings, roles=("cline",), flower=False) as stack:
        app: Celery = create_app(worker_settings, main="xnai_test_prompt_cache")
        try:
            stack.wait_workers(app)
        finally:
            app.close()
        client = Client(worker_settings)
        yield stack, client
        client.close()


def submit(client: Client, task: str, **kwargs: Any) -> dict[str, Any]:
    result = client.submit("cline", task, **kwargs).get(timeout=240)
    assert isinstance(result, dict)
    return result


def test_a_preloading_workers_child_answers_with_its_own_cache(cline: tuple[Stack, Client]) -> None:
    stack, client = cline
    # Given a cline worker that preloaded its LLM before forking its one pool child
    health = submit(client, "health")
    assert [m["mode"] for m in health["models"]] == ["preload"]
    # When the child writes docs, then code, then docs again
    submit(client, "generate_docs", topic="retries", context="Tasks retry with backoff.", max_tokens=4, seed=1)
    submit(client, "generate_code", spec="add two numbers", max_tokens=4, seed=1)
    last = submit(client, "generate_docs", topic="signing", context="Messages are signed.", max_tokens=4, seed=1)
    # Then its cache was made in that child (not in the worker parent), restored the docs instructions,
    # and holds no more than XNAI_PROMPT_CACHE_MB
    cache = last["prompt_cache"]
    parent = stack.children["cline"].pid
    assert cache["pid"] == last["pid"] != parent
    assert psutil.Process(last["pid"]).ppid() == parent
    assert cache["restored"] >= 1 and cache["evaluated"] == 2
    assert 0 < cache["bytes"] <= cache["capacity_bytes"] == 8 * MiB
