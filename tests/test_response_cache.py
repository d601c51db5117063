"""The response cache over real workers (ACLs on): exact hits before enqueue, signed entries, bounds, semantic.

One module-scoped stack: the embedded Redis with its ACL users, a curation worker (the real encoder, lazily
loaded), a grok worker (the real LLM and encoder, for the semantic lookup), the metrics endpoint. Entries
live 15 s (XNAI_CACHE_TTL) and the cache holds 1 MiB per role, so expiry and the cap show within the module.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import redis

from xnai_tasks.cache import admin, store
from xnai_tasks.cache.entry import cache_key, model_ids, sign_entry
from xnai_tasks.cache.policy import cache_mode
from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.security.publish import load_agent
from xnai_tasks.security.redis_urls import connection_url
from xnai_tasks.settings import Settings

from support import (
    admin_connection,
    free_port,
    metric_value,
    run_xnai,
    running_stack,
    scrape,
    short_home,
    wait_for_metric,
)

TTL_S = 15
EMBEDS = {"role": "curation", "task": "embed", "outcome": "succeeded"}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(
        home=short_home(),
        metrics_port=free_port(),
        model_mode="lazy",
        llm_safe="off",
        cache_ttl=TTL_S,
        cache_max_mb=1,
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    with running_stack(settings, ("curation", "grok"), metrics=True):
        made = Client(settings)
        yield made
        made.close()


@pytest.fixture(scope="module")
def admin_conn(client: Client, settings: Settings) -> Iterator[redis.Redis]:
    with admin_connection(settings) as conn:
        yield conn


def _texts() -> list[str]:
    return [f"a sentence never asked before {uuid.uuid4().hex}"]


def _until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.2)


def _cached(client: Client, settings: Settings, texts: list[str]) -> tuple[str, dict[str, Any]]:
    """Run embed(texts) once and wait until its answer is in the cache; the task's id and result."""
    handle = client.submit("curation", "embed", texts=texts)
    first = handle.get(timeout=120)
    _until(lambda: admin.match(settings, "curation", "embed", {"texts": texts})["hit"])
    return handle.id, dict(first)


def _ran(settings: Settings) -> float:
    return metric_value(scrape(settings), "xnai_tasks_total", **EMBEDS)


def _counts(conn: redis.Redis) -> dict[str, int]:
    return store.counts(conn)["curation"]


def _stored_beyond(conn: redis.Redis, stored: int) -> bool:
    return _counts(conn).get("stored", 0) > stored


def test_a_repeated_deterministic_request_is_served_from_the_cache_without_running(
    client: Client, settings: Settings
) -> None:
    # Given an embed request that ran once, and the worker's count of embed runs after it
    texts = _texts()
    task_id, first = _cached(client, settings, texts)
    ran = wait_for_metric(settings, "xnai_tasks_total", 1, **EMBEDS)
    before = metric_value(ran, "xnai_tasks_total", **EMBEDS)
    # When the same request is submitted again
    handle = client.submit("curation", "embed", texts=texts)
    again = handle.get(timeout=5)
    # Then it is answered from the cache: the same vectors, and it says so, naming the task that ran
    assert again["cache"] == {"kind": "exact", "score": 1.0, "source_task": task_id}
    assert again["vectors"] == first["vectors"] and handle.state == "SUCCESS"
    assert metric_value(scrape(settings), "xnai_cache_total", role="curation", outcome="hit") >= 1
    # And the worker did not run it: one fresh request later, its count grew by that one only
    client.submit("curation", "embed", texts=_texts()).get(timeout=60)
    after = metric_value(
        wait_for_metric(settings, "xnai_tasks_total", before + 1, **EMBEDS), "xnai_tasks_total", **EMBEDS
    )
    assert after == before + 1


def test_an_altered_or_forged_entry_is_refused_counted_and_the_task_runs(
    client: Client, settings: Settings, admin_conn: redis.Redis
) -> None:
    # Given a cached answer, and its entry altered in Redis (a vector changed, the signature kept)
    texts = _texts()
    first = _cached(client, settings, texts)[1]
    key = admin.match(settings, "curation", "embed", {"texts": texts})["key"]
    name = c.cache_entry_key("curation", key)
    entry = json.loads(admin_conn.get(name))
    entry["body"]["result"]["vectors"][0][0] += 1.0
    admin_conn.set(name, json.dumps(entry), ex=TTL_S)
    bad_before = _counts(admin_conn).get("bad_entry", 0)
    # When the request is submitted again
    answer = client.submit("curation", "embed", texts=texts).get(timeout=60)
    # Then the altered entry is not served (refused: bad signature), it is counted, and the task ran
    assert "cache" not in answer and answer["vectors"] == first["vectors"]
    assert _counts(admin_conn)["bad_entry"] == bad_before + 1
    # Given an entry forged with another role's key (grok's) for a request never run
    forged_texts = _texts()
    models = model_ids(admin_conn.hgetall(c.model_verdicts_key("curation")))
    forged_key = cache_key("curation", "embed", {"texts": forged_texts}, models)
    body = {
        "key": forged_key, "role": "curation", "task": "embed", "models": models,
        "result": {"vectors": [[0.0]], "forged": True}, "source_task": "forged", "created": time.time(),
    }  # fmt: skip
    admin_conn.set(c.cache_entry_key("curation", forged_key), sign_entry(load_agent(settings.home, "grok").get(), body))
    # When that request is submitted
    real = client.submit("curation", "embed", texts=forged_texts).get(timeout=60)
    # Then the forgery is refused (signed by grok, not curation) and counted; the worker answered instead
    assert "forged" not in real and "cache" not in real and real["count"] == 1
    assert _counts(admin_conn)["bad_entry"] == bad_before + 2
    assert metric_value(scrape(settings), "xnai_cache_total", role="curation", outcome="bad_entry") == bad_before + 2


def test_a_new_model_never_sees_old_entries(client: Client, settings: Settings, admin_conn: redis.Redis) -> None:
    # Given a cached answer
    texts = _texts()
    _cached(client, settings, texts)
    verdicts_key = c.model_verdicts_key("curation")
    published = admin_conn.hgetall(verdicts_key)
    # When the role's worker publishes another encoder checksum (as it does when it starts with a new model)
    changed = {name: json.dumps(json.loads(raw) | {"sha256": "0" * 64}) for name, raw in published.items()}
    admin_conn.hset(verdicts_key, mapping=changed)
    try:
        # Then the earlier answer is no longer a match, and a submit runs the task instead of serving it
        assert admin.match(settings, "curation", "embed", {"texts": texts})["hit"] is False
        answer = client.submit("curation", "embed", texts=texts).get(timeout=60)
        assert "cache" not in answer
    finally:
        admin_conn.hset(verdicts_key, mapping=published)


def test_the_cap_holds_under_a_flood_of_distinct_requests(
    client: Client, settings: Settings, admin_conn: redis.Redis
) -> None:
    # Given the evictions so far and a cap of 1 MiB for curation's cache
    cap = settings.cache_max_mb << 20
    evicted_before = _counts(admin_conn).get("evicted", 0)
    # When 12 distinct requests of about 150 KB of answer each run
    handles = [
        client.submit("curation", "embed", texts=[f"{uuid.uuid4().hex} {i}" for i in range(20)]) for _ in range(12)
    ]
    for handle in handles:
        handle.get(timeout=120)
    _until(lambda: admin_conn.zcard(c.cache_lru_key("curation")) >= 5)
    # Then the counted bytes and the entries' real size in Redis stay under the cap, and the oldest were evicted
    counted = int(admin_conn.get(c.cache_bytes_key("curation")) or 0)
    members = [m.decode() for m in admin_conn.zrange(c.cache_lru_key("curation"), 0, -1)]
    real = sum(admin_conn.memory_usage(c.cache_entry_key("curation", m)) or 0 for m in members)
    assert 0 < counted <= cap and real <= cap
    assert _counts(admin_conn)["evicted"] > evicted_before


def test_entries_expire(client: Client, settings: Settings, admin_conn: redis.Redis) -> None:
    # Given a cached answer whose entry has a TTL
    texts = _texts()
    _cached(client, settings, texts)
    key = admin.match(settings, "curation", "embed", {"texts": texts})["key"]
    assert 0 < admin_conn.ttl(c.cache_entry_key("curation", key)) <= TTL_S
    # When XNAI_CACHE_TTL passes
    _until(lambda: not admin.match(settings, "curation", "embed", {"texts": texts})["hit"], timeout=TTL_S + 30)
    # Then it is gone: no match, and a submit runs the task
    assert admin.match(settings, "curation", "embed", {"texts": texts})["hit"] is False
    assert "cache" not in client.submit("curation", "embed", texts=texts).get(timeout=60)


def test_cache_off_bypasses_the_cache(client: Client, settings: Settings) -> None:
    # Given a cached answer and the count of embed runs
    texts = _texts()
    _cached(client, settings, texts)
    before = _ran(settings)
    # When the same request is submitted with cache="off"
    answer = client.submit("curation", "embed", cache="off", texts=texts).get(timeout=60)
    # Then the worker ran it
    assert "cache" not in answer
    samples = wait_for_metric(settings, "xnai_tasks_total", before + 1, **EMBEDS)
    assert metric_value(samples, "xnai_tasks_total", **EMBEDS) >= before + 1


def test_the_cache_commands(client: Client, settings: Settings) -> None:
    # Given a cached answer
    texts = _texts()
    _cached(client, settings, texts)
    kwargs = json.dumps({"texts": texts})
    # When `xnai cache match` asks about it, then about another request
    hit = run_xnai(["cache", "match", "curation", "embed", "--kwargs", kwargs, "--json"], settings)
    miss = run_xnai(
        ["cache", "match", "curation", "embed", "--kwargs", json.dumps({"texts": _texts()}), "--json"], settings
    )
    # Then it says exact hit (with the task that answered), and miss
    assert hit.returncode == 0, hit.stderr
    found = json.loads(hit.stdout)
    assert found["hit"] is True and found["kind"] == "exact" and found["score"] == 1.0 and found["source_task"]
    assert json.loads(miss.stdout)["hit"] is False
    # When stats, forget KEY and clear run
    stats = {row["role"]: row for row in json.loads(run_xnai(["cache", "stats", "--json"], settings).stdout)}
    forget = run_xnai(["cache", "forget", found["key"], "--json"], settings)
    after_forget = json.loads(
        run_xnai(["cache", "match", "curation", "embed", "--kwargs", kwargs, "--json"], settings).stdout
    )
    cleared = run_xnai(["cache", "clear", "curation"], settings)
    after_clear = json.loads(run_xnai(["cache", "stats", "--json"], settings).stdout)
    # Then stats counted the entries, forget dropped that one, clear dropped the rest
    assert stats["curation"]["entries"] >= 1 and stats["curation"]["hit"] >= 1
    assert json.loads(forget.stdout) == {"forgotten": True, "role": "curation"} and after_forget["hit"] is False
    assert cleared.returncode == 0, cleared.stderr
    assert next(row for row in after_clear if row["role"] == "curation")["entries"] == 0


def test_each_role_writes_only_its_own_cache(client: Client, settings: Settings) -> None:
    # Given the copilot's (the client's) and grok's Redis users
    copilot = broker.connect(connection_url(settings, "copilot"))
    grok = broker.connect(connection_url(settings, "grok"))
    try:
        # When they read and write curation's cache
        copilot.get(c.cache_entry_key("curation", "k"))  # reading is allowed
        # Then writing is refused to both
        for conn in (copilot, grok):
            with pytest.raises(redis.exceptions.NoPermissionError):
                conn.set(c.cache_entry_key("curation", "k"), "{}")
        # And grok reads, but cannot write, the copilot's record of the hits it served from grok's cache
        grok.zscore(c.cache_touch_key("grok"), "k")
        with pytest.raises(redis.exceptions.NoPermissionError):
            grok.zadd(c.cache_touch_key("grok"), {"k": 1.0})
    finally:
        copilot.close()
        grok.close()


def test_only_deterministic_requests_are_cached_by_default() -> None:
    # Given LLM requests with and without a fixed sampling, and tasks that read changing state
    prompt = {"prompt": "compare two queues"}
    # When the client settles their cache mode with no cache= given
    # Then only what is deterministic is cached: an encoder task, temperature 0 or a seed
    assert cache_mode("grok", "synthesize", prompt, None, enabled=True) == "off"
    assert cache_mode("grok", "synthesize", prompt | {"temperature": 0}, None, enabled=True) == "exact"
    assert cache_mode("grok", "synthesize", prompt | {"seed": 7}, None, enabled=True) == "exact"
    assert cache_mode("curation", "embed", {"texts": ["a"]}, None, enabled=True) == "exact"
    assert cache_mode("grok", "synthesize", prompt, "exact", enabled=True) == "exact"  # asked for
    assert cache_mode("curation", "search", {"query": "a"}, "exact", enabled=True) == "off"  # reads the bank
    assert cache_mode("curation", "embed", {"texts": ["a"]}, None, enabled=False) == "off"  # XNAI_CACHE=off


def test_a_close_earlier_request_answers_a_semantic_one_the_guard_refuses_a_near_miss(
    client: Client, settings: Settings, admin_conn: redis.Redis
) -> None:
    # Given an LLM answer stored with its request's vector (cache="semantic"), and the LLM tokens counted so far
    asked: dict[str, Any] = {"prompt": "Compare Celery and Dramatiq for background jobs.", "max_tokens": 8, "seed": 3}
    handle = client.submit("grok", "synthesize", cache="semantic", **asked)
    handle.get(timeout=180)
    _until(lambda: admin.match(settings, "grok", "synthesize", asked)["hit"])
    tokens = {"role": "grok", "model": "gemma-3-270m-q4_k_m"}
    before = metric_value(
        wait_for_metric(settings, "xnai_llm_tokens_total", 1, **tokens), "xnai_llm_tokens_total", **tokens
    )
    # When a rewording of it is submitted with cache="semantic"
    reworded = asked | {"prompt": "How do Celery and Dramatiq differ as background job queues?"}
    answer = client.submit("grok", "synthesize", cache="semantic", **reworded).get(timeout=120)
    # Then the worker answered it from the earlier one, without generating, and says so with the cosine
    assert answer["cache"]["kind"] == "semantic" and answer["cache"]["source_task"] == handle.id
    assert answer["cache"]["score"] >= 0.72
    assert metric_value(scrape(settings), "xnai_llm_tokens_total", **tokens) == before
    # And `xnai cache match` finds the same (nothing runs)
    found = admin.match(settings, "grok", "synthesize", reworded)
    assert found["hit"] is True and found["kind"] == "semantic" and found["source_task"] == handle.id
    # Given an answer to "start a worker"; When "stop a worker" is asked with the same arguments
    start: dict[str, Any] = {"prompt": "Explain how to start a Celery worker.", "max_tokens": 8, "seed": 4}
    client.submit("grok", "synthesize", cache="semantic", **start).get(timeout=120)
    _until(lambda: admin.match(settings, "grok", "synthesize", start)["hit"])
    refused = store.counts(admin_conn)["grok"].get("refused", 0)
    stop = client.submit(
        "grok", "synthesize", cache="semantic", **(start | {"prompt": "Explain how to stop a Celery worker."})
    )
    # Then the guard refuses the near miss (counted) and the LLM answers it
    assert "cache" not in stop.get(timeout=120)
    assert store.counts(admin_conn)["grok"]["refused"] == refused + 1


def test_an_entry_in_use_outlives_older_unused_ones(
    client: Client, settings: Settings, admin_conn: redis.Redis
) -> None:
    # Given curation's cache emptied, then two answers of about 150 KB each (cap 1 MiB): A, then B
    admin.clear(settings, "curation")

    def big() -> list[str]:
        return [f"{uuid.uuid4().hex} {i}" for i in range(20)]

    a, b = big(), big()
    _cached(client, settings, a)
    _cached(client, settings, b)
    evicted = _counts(admin_conn).get("evicted", 0)
    # When A keeps being served from the cache while more answers than the cap holds are stored after it
    for _ in range(7):
        assert client.submit("curation", "embed", texts=a).get(timeout=5)["cache"]["kind"] == "exact"
        stored = _counts(admin_conn)["stored"]
        client.submit("curation", "embed", texts=big()).get(timeout=60)
        _until(partial(_stored_beyond, admin_conn, stored))
    # Then entries were evicted, B (stored after A, never used since) among them, and A is still served
    assert _counts(admin_conn)["evicted"] > evicted
    assert admin.match(settings, "curation", "embed", {"texts": b})["hit"] is False
    assert admin.match(settings, "curation", "embed", {"texts": a})["hit"] is True
