"""A role flooding everything it may write cannot fill Redis for the others: the memory guard locks it out.

Real processes: the embedded Redis with a small cap (XNAI_REDIS_MAXMEMORY_MB), the guard ``xnai up`` runs,
a grok worker, and the copilot's client; the flood is cline's own credential, as a compromised cline
worker would hold it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis
from celery import Celery

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.observability.status import collect_status, format_status
from xnai_tasks.ops.memory_guard import MemoryGuard, owner_of
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.security.keyring import load_signer, shared_keyring
from xnai_tasks.settings import Settings

from support import publish_raw, run_xnai, short_home

pytestmark = pytest.mark.slow

CAP_MB = 256


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return Settings(home=short_home(), model_mode="lazy", redis_maxmemory_mb=CAP_MB)


def test_every_key_a_role_may_write_is_counted_as_that_roles() -> None:
    # Given the names of everything cline's ACL lets it write, Then each is counted as cline's
    for key in (
        c.result_key("cline", "abc"),
        c.nonce_key("cline", "n1"),
        c.dead_letter_key("cline"),
        c.refused_counter_key("cline"),
        c.lost_key("cline", "id", 0),
        c.deaths_key("cline"),
        c.model_verdicts_key("cline"),
        c.control_nonce_key("cline", "n2"),
        c.unacked_key("cline"),
        c.unacked_index_key("cline"),
        f"{c.KOMBU_BINDING_PREFIX}cline",
        "cline@host.celery.pidbox",
    ):
        assert owner_of(key) == "cline", key
    # ... its queue is the copilot's or its own, by what the queue holds; the bank is curation's
    assert owner_of("cline") == "queue:cline"
    assert owner_of(c.bank_chunk_key("doc", 0)) == "curation"
    assert owner_of(f"{c.GROUP_KEY_PREFIX}g.j") == "copilot"
    assert owner_of("abc.reply.celery.pidbox") == "control"


def _flood_targets(cline: redis.Redis, blob: bytes) -> list[Callable[[int], object]]:
    """Every kind of key cline may write, each written with ``blob``."""
    return [
        lambda i: cline.set(c.result_key("cline", f"flood-{i}"), blob),
        lambda i: cline.set(c.nonce_key("cline", f"flood-{i}"), blob),
        lambda i: cline.lpush(c.dead_letter_key("cline"), blob),
        lambda i: cline.lpush(c.queue_for("cline"), blob),
        lambda i: cline.hset(c.unacked_key("cline"), f"flood-{i}", blob),
    ]


def test_a_role_flooding_redis_is_locked_out_and_the_others_go_on(
    grok_worker: None, private_settings: Settings, private_client: Client
) -> None:
    admin = broker.connect(redis_urls.connection_url(private_settings, acl.ADMIN))
    cap = int(admin.info("memory")["maxmemory"])
    assert cap == CAP_MB * 2**20  # the cap the plan gave, through XNAI_REDIS_MAXMEMORY_MB
    # Given the copilot keeps sending grok tasks while ...
    answers: list[object] = []
    stop = threading.Event()

    def keep_submitting() -> None:
        n = 0
        while not stop.is_set():
            answers.append(private_client.submit("grok", "echo", value=n).get(timeout=60))
            n += 1

    submitter = threading.Thread(target=keep_submitting, daemon=True)
    submitter.start()
    # ... cline's credential writes 1 MiB values into every kind of key it may write, as fast as it can
    cline = broker.connect(redis_urls.connection_url(private_settings, "cline"))
    targets = _flood_targets(cline, b"x" * 2**20)
    stopped_by: Exception | None = None
    deadline = time.monotonic() + 60
    i = 0
    while time.monotonic() < deadline:
        try:
            targets[i % len(targets)](i)
        except redis.RedisError as exc:
            stopped_by = exc
            break
        i += 1
    # Then the flood is cut off by the lock, never by a full Redis ...
    assert stopped_by is not None, f"the flood wrote {i} MiB and was never stopped"
    assert "OOM" not in str(stopped_by), stopped_by
    assert "off" in admin.acl_getuser("cline")["flags"]
    with pytest.raises(redis.RedisError):  # ... and cline cannot come back
        broker.connect(redis_urls.connection_url(private_settings, "cline")).ping()
    used = int(admin.info("memory")["used_memory"])
    assert used < cap, f"Redis reached its cap: {used} of {cap}"
    # ... and the copilot and grok went on and go on: every task answered, nobody was refused for memory
    more = [private_client.submit("grok", "echo", value=f"after {n}") for n in range(5)]
    assert [h.get(timeout=60) for h in more] == [f"after {n}" for n in range(5)]
    stop.set()
    submitter.join(timeout=90)
    assert answers == list(range(len(answers))) and len(answers) >= 1
    assert "errorstat_OOM" not in admin.info("errorstats")
    # And the lock is one line in `xnai status`, until the operator lifts it
    text = format_status(collect_status(private_settings))
    assert "cline is locked out of Redis by the memory guard: cline held ~" in text, text
    # (the flood's keys are the operator's to clear, first: the guard deletes nothing a role wrote, and
    # locks the role again while it holds too much)
    assert admin.exists(c.result_key("cline", "flood-0"))
    for pattern in (c.result_key_pattern("cline"), c.nonce_pattern("cline")):
        for key in admin.scan_iter(match=pattern, count=1000):
            admin.delete(key)
    admin.delete(c.dead_letter_key("cline"), c.queue_for("cline"), c.unacked_key("cline"))
    unlocked = run_xnai(["acl", "unlock", "cline"], private_settings)
    assert unlocked.returncode == 0 and "unlocked cline (it was locked: cline held" in unlocked.stdout
    assert broker.connect(redis_urls.connection_url(private_settings, "cline")).ping()
    admin.close()


def test_unlocking_needs_a_role_name() -> None:
    # Given no role name, When unlocking, Then a usage error (exit 2) says what is missing
    done = run_xnai(["acl", "unlock"])
    assert done.returncode == 2 and "unknown role ''" in done.stderr


def test_unlocking_without_redis_says_it_is_unreachable() -> None:
    # Given a home whose embedded Redis is not running
    stopped = Settings(home=short_home())
    # When a role is unlocked
    done = run_xnai(["acl", "unlock", "cline"], stopped)
    # Then one line says the broker is unreachable (exit 6), with no traceback
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("xnai: broker unreachable at") and "Traceback" not in done.stderr


def test_the_copilots_backlog_is_not_a_roles_flood(
    private_stack: Stack, private_settings: Settings, private_app: Celery
) -> None:
    # Given 24 MiB of genuine copilot messages waiting in cline's queue (no cline worker runs here)
    admin = broker.connect(redis_urls.connection_url(private_settings, acl.ADMIN))
    said: list[str] = []
    guard = MemoryGuard(
        admin, shared_keyring(private_settings.home), max_message_age=private_settings.max_message_age, say=said.append
    )
    copilot = load_signer(private_settings.home, "copilot")
    sent = [
        publish_raw(private_app, task="cline.echo", queue="cline", kwargs={"value": "x" * 2**20}, signer=copilot)
        for _ in range(24)
    ]
    cap = int(admin.config_get("maxmemory")["maxmemory"])
    try:
        # When Redis is under pressure (its cap lowered to just above what it holds)
        admin.config_set("maxmemory", int(int(admin.info("memory")["used_memory"]) * 1.3))
        locks = guard.check_once()
        # Then the backlog counts as the copilot's: nobody is locked out, and the guard says who holds what
        assert locks == [] and "off" not in admin.acl_getuser("cline")["flags"]
        assert said and "the most copilot's" in said[-1], said
        # But one copy of a message already in the queue makes it a flood of cline's own
        cline = broker.connect(redis_urls.connection_url(private_settings, "cline"))
        cline.lpush("cline", admin.lindex("cline", 0) or b"")
        cline.close()
        assert guard.measure(sample=False).top()[0] == "cline"
    finally:
        admin.config_set("maxmemory", cap)
        admin.delete("cline")
        time.sleep(0.5)  # the stack's own guard may have seen the same pressure: let its look end first
        admin.hdel(c.guard_locks_key(), "cline")
        admin.execute_command("ACL", "SETUSER", "cline", "on")
        admin.close()
    assert len(sent) == 24
