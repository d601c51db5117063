"""Host bundles: what a worker host of a hub gets (`xnai host bundle`), installing it (`xnai host join`), and a
revocation on the hub reaching the joined host through Redis within 5 s.

The hub is a private embedded Redis with keys and ACLs; the "other host" is a second XNAI_HOME on this machine that
reaches the hub by its socket URL, and runs a real grok worker from its bundle alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from xnai_tasks.bench.harness import start_worker, stop_worker, wait_online
from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.core.broker import connect
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import KeyringError, ResultSignatureError, SettingsError, TaskTimeoutError, UsageError
from xnai_tasks.security import bundle as bundles
from xnai_tasks.security import revocation_list
from xnai_tasks.security.joined_host import check_not_in_clear, joined_host_path
from xnai_tasks.security.key_pair import KeyStatus, Signer
from xnai_tasks.security.key_store import keyring_path, keys_dir, read_seed
from xnai_tasks.security.keyring import REFRESH_S, Keyring, load_signer
from xnai_tasks.security.password_file import ensure_passwords
from xnai_tasks.security.redis_urls import connection_url
from xnai_tasks.security.result_signature import verify_result
from xnai_tasks.security.revocation_list import cache_path, read_cache, revoked_in_keyring
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.settings import Settings

from support import admin_connection, free_port, lazy_settings, publish_raw, run_xnai, short_home

#: The brief: within 5 s; the poll gives it twice that, and records what it took.
REVOCATION_POLL_S = 10.0


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return lazy_settings()


def hub_url(hub: Settings) -> str:
    """The hub as another home on this machine reaches it: its socket, no credentials."""
    return f"redis+socket://{hub.redis_socket}"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bundle_file(private_stack: Any, private_settings: Settings) -> Path:
    out = private_settings.home / "grok-bundle.json"
    done = run_xnai(["host", "bundle", "grok", "--url", hub_url(private_settings), "-o", str(out)], private_settings)
    assert done.returncode == 0, done.stderr
    assert "sha256" in done.stdout
    return out


def joined_settings(home: Path) -> Settings:
    env = {"XNAI_HOME": str(home), "XNAI_MODEL_MODE": "lazy", "XNAI_LLM_SAFE": "off"}
    return Settings.from_env({**env, "XNAI_METRICS_PORT": str(free_port())})


@pytest.fixture(scope="module")
def joined(bundle_file: Path) -> Iterator[Settings]:
    home = short_home()
    done = run_xnai(["host", "join", str(bundle_file)], env={"XNAI_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert "joined redis+socket://" in done.stdout
    yield joined_settings(home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def joined_worker(joined: Settings, private_app: Celery) -> Iterator[None]:
    """The joined host's grok worker: its XNAI_HOME and nothing else (no XNAI_REDIS_URL)."""
    assert "XNAI_REDIS_URL" not in joined.to_env()
    proc = start_worker(joined, "grok", concurrency=1)
    try:
        wait_online(proc, private_app, "grok", timeout=120)
        yield
    finally:
        stop_worker(proc)


@pytest.fixture(scope="module")
def joined_app(joined: Settings) -> Iterator[Celery]:
    """A Celery app of the joined host (it connects as grok, the only credential it holds)."""
    app = create_app(joined, main="xnai_test_joined")
    yield app
    app.close()


# ---- the bundle ----


def test_bundle_holds_exactly_what_a_grok_host_needs(bundle_file: Path, private_settings: Settings) -> None:
    # Given a bundle made on the hub for grok
    hub = private_settings.home
    raw = bundle_file.read_text()
    doc = json.loads(raw)
    passwords = ensure_passwords(hub)
    grok = load_signer(hub, "grok")
    # Then it is private, and holds grok's URL with grok's password, grok's key, the public keyring: nothing else
    assert mode_of(bundle_file) == 0o600
    assert set(doc) == {"format", "version", "hub", "roles", "keyring", "tls", "digest"}
    assert doc["hub"] == hub_url(private_settings)
    assert list(doc["roles"]) == ["grok"]
    role = doc["roles"]["grok"]
    assert set(role) == {"url", "kid", "private_key"}
    assert role["url"] == f"redis+socket://grok:{passwords['grok']}@{private_settings.redis_socket}"
    assert role["kid"] == grok.kid
    assert role["private_key"] == bytes(grok.signing_key).hex()
    assert doc["keyring"] == json.loads(keyring_path(hub).read_text())
    assert doc["tls"] is None  # this hub has no TLS CA
    for user, password in passwords.items():  # no other password, not the admin's
        assert (password in raw) == (user == "grok"), user
    for key_file in keys_dir(hub).glob("*.key"):  # no other private key
        assert (read_seed(key_file).hex() in raw) == key_file.name.startswith("grok."), key_file.name


def test_bundle_refuses_a_url_with_credentials_or_an_unknown_role(private_settings: Settings) -> None:
    # Given a URL that carries a password, and a role that does not exist
    with_password = f"redis://admin:{ensure_passwords(private_settings.home)['admin']}@127.0.0.1:6379/0"
    # When bundles are asked for them
    bad_url = run_xnai(["host", "bundle", "grok", "--url", with_password, "-o", "/tmp/never.json"], private_settings)
    bad_role = run_xnai(["host", "bundle", "ghost", "--url", hub_url(private_settings)], private_settings)
    # Then each is one line and exit 2, and nothing is written
    assert bad_url.returncode == 2 and "must not carry a user or password" in one_line(bad_url)
    assert bad_role.returncode == 2 and "unknown role 'ghost'" in one_line(bad_role)
    assert not Path("/tmp/never.json").exists()


def test_bundle_refuses_a_plain_redis_url_to_another_host(private_settings: Settings) -> None:
    # Given a plain redis:// URL naming a host on the network
    url = "redis://10.0.0.9:6379/0"
    # When a bundle is asked for it
    done = run_xnai(["host", "bundle", "grok", "--url", url, "-o", "/tmp/never.json"], private_settings)
    # Then it is one line, exit 2, pointing at rediss://, and nothing is written
    line = one_line(done)
    assert done.returncode == 2 and "is plain redis:// to 10.0.0.9, which is not loopback" in line, line
    assert "use rediss:// (xnai tls init on the hub, XNAI_REDIS_TLS_PORT)" in line
    assert not Path("/tmp/never.json").exists()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://127.8.0.1:6379/0", True),
        ("redis://[::1]:6379/0", True),
        ("redis://LocalHost:6379/0", True),
        ("rediss://hub.example:6380/0", True),
        ("redis+socket:///tmp/redis.sock", True),
        ("redis://hub.example:6379/0", False),
        ("redis://[fe80::1]:6379/0", False),
        ("redis://localhost.evil.example:6379/0", False),
    ],
)
def test_only_a_loopback_hub_may_be_plain_redis(url: str, allowed: bool) -> None:
    # Given a hub URL; When it is checked for a bundle
    if allowed:
        # Then loopback, TLS and socket URLs pass as they are
        assert check_not_in_clear(url, "--url") == url
    else:
        # And a plain one to another host is refused, naming the URL
        with pytest.raises(UsageError, match=r"^--url '.*' is plain redis:// to .*: .* use rediss://"):
            check_not_in_clear(url, "--url")


# ---- the revocation list in Redis ----


def test_a_malformed_revocation_list_is_replaced_by_the_keyrings(
    private_stack: Any, private_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the hub's Redis holding a malformed revocation list
    keyring_revoked = revoked_in_keyring(private_settings.home)
    with admin_connection(private_settings) as admin:
        admin.set(c.revoked_keys_key(), b"{not a list")
        caplog.set_level(logging.WARNING, logger=revocation_list.__name__)
        # When the hub publishes its revoked keys
        published = revocation_list.publish(admin, keyring_revoked)
        # Then the list is the keyring's again, with one warning line saying so
        assert published == keyring_revoked
        assert admin.get(c.revoked_keys_key()) == revocation_list.encode(keyring_revoked)
    warnings = [m for m in caplog.messages if "revocation list in Redis is malformed" in m]
    assert len(warnings) == 1 and "replacing it with the keyring's" in warnings[0], caplog.messages
    # And `xnai host publish` works on it from then on
    done = run_xnai(["host", "publish"], private_settings)
    assert done.returncode == 0 and done.stdout.startswith("published "), done.stderr


def test_publishing_gives_up_after_bounded_retries(
    private_stack: Any, private_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given another writer that changes the list between each WATCH and EXEC of the hub's publish
    attempts = []
    real_decode = revocation_list.decode
    with admin_connection(private_settings) as admin, admin_connection(private_settings) as other:

        def racing_decode(raw: Any) -> frozenset[str]:
            attempts.append(raw)
            other.set(c.revoked_keys_key(), revocation_list.encode([]))
            return real_decode(raw)

        monkeypatch.setattr(revocation_list, "decode", racing_decode)
        # When the hub publishes, Then it stops after the bound, in one line
        with pytest.raises(redis.RedisError, match=r"changed under each of 10 attempts to publish: try again$"):
            revocation_list.publish(admin, [])
    assert len(attempts) == revocation_list.PUBLISH_ATTEMPTS == 10


# ---- joining ----


def test_join_installs_private_files_and_points_the_home_at_the_hub(joined: Settings, bundle_file: Path) -> None:
    # Given a home that joined with the grok bundle
    home = joined.home
    kid = json.loads(bundle_file.read_text())["roles"]["grok"]["kid"]
    # Then every file it wrote is 0600, and it holds grok's private key only
    key_files = sorted(keys_dir(home).glob("*.key"))
    assert [p.name for p in key_files] == [f"grok.{kid}.key"]
    for path in (joined_host_path(home), keyring_path(home), *key_files):
        assert mode_of(path) == 0o600, path
    # And its settings connect to the hub as grok, read once from the home with no XNAI_REDIS_URL
    assert joined.joined_roles == ("grok",)
    assert not joined.embedded
    assert joined.broker_url.startswith("redis+socket://grok:")
    assert joined.default_agent == "grok"
    # And it holds no credential of another user
    with pytest.raises(SettingsError, match="holds no credential of 'admin'"):
        connection_url(joined, "admin")


def test_task_from_hub_runs_on_the_joined_worker(private_client: Client, joined_worker: None) -> None:
    # Given the joined host's grok worker, the only grok worker online
    # When the hub's copilot sends it a task
    handle = private_client.submit("grok", "echo", value=42)
    # Then it runs there and its signed result verifies on the hub
    assert handle.get(timeout=60) == 42
    assert handle.stored()[SIG_HEADER]["agent"] == "grok"


def test_joined_host_submits_as_its_own_role(joined: Settings, joined_worker: None) -> None:
    # Given a client of the joined host signing as grok, the agent whose key it holds
    client = Client(joined, agent="grok")
    try:
        # When it sends a grok task through the hub
        result = client.submit("grok", "echo", value="from the joined host").get(timeout=60)
    finally:
        client.close()
    # Then it runs, and the result verifies with the joined host's keyring
    assert result == "from the joined host"


def test_joined_host_cannot_reach_another_roles_queue_or_results(joined: Settings) -> None:
    # Given a Redis connection with the only credential the joined host holds
    conn = connect(connection_url(joined, "grok"), retries=0)
    try:
        # When it touches cline's queue and results, or writes the revocation list
        attempts = [
            ("LPUSH", c.queue_for("cline"), "x"),
            ("LLEN", c.queue_for("cline")),
            ("GET", c.result_key("cline", "00000000-0000-0000-0000-000000000000")),
            ("SET", c.revoked_keys_key(), "[]"),
        ]
        for command in attempts:
            # Then each is refused by the hub's ACL in one line
            with pytest.raises(redis.exceptions.NoPermissionError) as refused:
                conn.execute_command(*command)
            assert "\n" not in str(refused.value) and "permission" in str(refused.value).lower()
        # And it may read the revocation list
        conn.get(c.revoked_keys_key())
    finally:
        conn.close()


def test_joined_host_cannot_sign_as_another_agent(
    joined: Settings, joined_worker: None, joined_app: Celery, private_settings: Settings
) -> None:
    # Given the joined host, which holds grok's private key only
    # Then it has no key to sign as the copilot
    with pytest.raises(KeyringError, match="is missing"):
        load_signer(joined.home, "copilot")
    # When it signs a message with grok's key but names the copilot as the agent
    grok = load_signer(joined.home, "grok")
    forged = Signer(agent="copilot", kid=grok.kid, signing_key=grok.signing_key)
    with admin_connection(private_settings) as admin:
        before = int(admin.hget(c.refused_counter_key("grok"), "bad_signature") or 0)
        publish_raw(joined_app, task="grok.echo", queue=c.queue_for("grok"), kwargs={"value": 1}, signer=forged)
        # Then the grok worker refuses it (bad_signature), and nothing is run
        deadline = time.monotonic() + 30
        while int(admin.hget(c.refused_counter_key("grok"), "bad_signature") or 0) == before:
            assert time.monotonic() < deadline, "the forged message was not refused"
            time.sleep(0.1)


# ---- bad bundles ----


def _rewrite(path: Path, change: Any, *, digest: bool = True) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    if digest:
        doc["digest"] = bundles.digest_of({k: v for k, v in doc.items() if k != "digest"})
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


def _other_seed(doc: dict[str, Any]) -> None:
    doc["roles"]["grok"]["private_key"] = "11" * 32


def _revoke_in_keyring(doc: dict[str, Any]) -> None:
    kid = doc["roles"]["grok"]["kid"]
    for key in doc["keyring"]["keys"]:
        if key["kid"] == kid:
            key["revoked"] = True


BAD_BUNDLES = {
    "revoked key": (_revoke_in_keyring, True, "is revoked in its keyring"),
    "empty object": (lambda d: d.clear(), True, "has no field 'format'"),
    "tampered": (lambda d: d.update(hub="redis://evil.example:6379/0"), False, "digest does not match"),
    "missing field": (lambda d: d.pop("keyring"), True, "has no field 'keyring'"),
    "unknown field": (lambda d: d.update(admin_password="x"), True, "unknown field 'admin_password'"),
    "swapped key": (_other_seed, True, "is not the key"),
    "other server": (lambda d: d.update(hub="redis://127.0.0.2:6379/0"), True, "does not point at the hub"),
    "plain remote hub": (lambda d: d.update(hub="redis://10.0.0.9:6379/0"), True, "is plain redis:// to 10.0.0.9"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundle_is_refused_in_one_line(case: str, bundle_file: Path, tmp_path: Path) -> None:
    # Given a copy of a good bundle, changed
    change, redigest, reason = BAD_BUNDLES[case]
    bad = tmp_path / "bundle.json"
    shutil.copyfile(bundle_file, bad)
    _rewrite(bad, change, digest=redigest)
    home = short_home()
    try:
        # When a fresh home joins it
        done = run_xnai(["host", "join", str(bad)], env={"XNAI_HOME": str(home)})
        # Then it is refused in one line, exit 2, and the home is left as it was
        assert done.returncode == 2
        line = one_line(done)
        assert line.startswith(f"xnai: bundle {bad} refused: ") and reason in line, line
        assert not joined_host_path(home).exists() and not keyring_path(home).exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_bundle_readable_by_others_is_refused(bundle_file: Path, tmp_path: Path) -> None:
    # Given a bundle others may read
    loose = tmp_path / "bundle.json"
    shutil.copyfile(bundle_file, loose)
    loose.chmod(0o644)
    # When it is joined, then it is refused in one line naming the mode
    with pytest.raises(UsageError, match=r"refused: mode 0644 lets others read its secrets"):
        bundles.read_bundle(loose)
    done = run_xnai(["host", "join", str(loose)], env={"XNAI_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and "mode 0644" in one_line(done)


def test_the_hub_itself_cannot_join(bundle_file: Path, private_settings: Settings) -> None:
    # Given the hub's home, which has keys of its own
    # When it joins a bundle, then it is refused in one line and its keyring is untouched
    before = keyring_path(private_settings.home).read_bytes()
    done = run_xnai(["host", "join", str(bundle_file)], private_settings)
    assert done.returncode == 2 and "has a keyring of its own" in one_line(done)
    assert keyring_path(private_settings.home).read_bytes() == before


def test_a_joined_file_readable_by_others_is_refused_at_start(bundle_file: Path) -> None:
    # Given a joined home whose host.json was made readable by others
    home = short_home()
    try:
        bundles.join(home, bundles.read_bundle(bundle_file))
        joined_host_path(home).chmod(0o644)
        # When a command starts there, then it stops in one line naming the file
        done = run_xnai(["status"], env={"XNAI_HOME": str(home)})
        assert done.returncode == 2 and "host.json has mode 0644" in one_line(done)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_host_commands_refuse_misuse_in_one_line(joined: Settings, private_settings: Settings) -> None:
    # Given the hub and a joined host
    cases = [
        (["host", "bundle", "grok"], private_settings, "needs --url"),
        (["host", "join"], private_settings, "usage: xnai host join BUNDLE"),
        (["host", "bundle", "grok", "--url", "redis://hub.example:6379/0"], joined, "is a joined host, not a hub"),
        (["host", "publish"], joined, "only the hub's admin may publish revocations"),
    ]
    for argv, settings, reason in cases:
        # When a host command is misused, then it is one line, exit 2
        done = run_xnai(argv, settings)
        assert done.returncode == 2 and reason in one_line(done), (argv, done.stderr)
    # And on the hub, publish sends the revoked keys again
    done = run_xnai(["host", "publish"], private_settings)
    assert done.returncode == 0 and done.stdout.startswith("published "), done.stderr


def test_a_malformed_joined_file_is_refused_at_start(bundle_file: Path) -> None:
    # Given a joined home whose host.json no longer names the hub's server for its role
    home = short_home()
    try:
        bundles.join(home, bundles.read_bundle(bundle_file))
        doc = json.loads(joined_host_path(home).read_text())
        doc["hub"] = "redis://elsewhere.example:6379/0"
        joined_host_path(home).write_text(json.dumps(doc))
        # When a command starts there, then it stops in one line naming the file
        done = run_xnai(["status"], env={"XNAI_HOME": str(home)})
        assert done.returncode == 2 and "host.json is malformed: the URL of grok" in one_line(done)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_bundle_refuses_tls_without_a_client_certificate_or_ca_key(private_settings: Settings) -> None:
    # Given a hub with a CA certificate but neither the CA's key nor a certificate for the host
    from xnai_tasks.security.certificates import ensure_ca
    from xnai_tasks.security.tls import TlsFiles

    hub = short_home()
    try:
        shutil.copytree(keys_dir(private_settings.home), keys_dir(hub))
        ensure_ca(TlsFiles.of(hub))
        TlsFiles.of(hub).ca_key.unlink()
        # When a bundle is made, then it is refused in one line
        with pytest.raises(UsageError, match=r"no client certificate .* for 'edge2', and no CA key here"):
            bundles.make_bundle(hub, ensure_passwords(hub), ["grok"], "rediss://hub.example:6380/0", host="edge2")
    finally:
        shutil.rmtree(hub, ignore_errors=True)


def test_a_hub_with_a_ca_requires_a_host_name_for_each_bundle(private_settings: Settings) -> None:
    # Given a hub home with a TLS CA (a copy of the module's hub keys)
    from xnai_tasks.security.certificates import ensure_ca
    from xnai_tasks.security.tls import TlsFiles

    hub = short_home()
    try:
        shutil.copytree(keys_dir(private_settings.home), keys_dir(hub))
        ensure_ca(TlsFiles.of(hub))
        argv = ["host", "bundle", "grok", "--url", "rediss://hub.example:6380/0", "-o", str(hub / "b.json")]
        # When a bundle is asked for without --host, or with a name that is not one
        bare = run_xnai(argv, env={"XNAI_HOME": str(hub)})
        climbing = run_xnai([*argv, "--host", "../server"], env={"XNAI_HOME": str(hub)})
        # Then each is one line, exit 2, and no bundle is written (no shared TLS identity, no server key)
        assert bare.returncode == 2 and "this hub has a TLS CA: name the host with --host NAME" in one_line(bare)
        assert climbing.returncode == 2 and "--host '../server' is not a host name" in one_line(climbing)
        assert not (hub / "b.json").exists()
        # And two hosts of the same roles get two certificates, while a host bundled again keeps its own
        made = {
            name: bundles.make_bundle(hub, ensure_passwords(hub), ["grok"], "rediss://hub.example:6380/0", host=name)
            for name in ("edge1", "edge2")
        }
        assert made["edge1"].tls is not None and made["edge2"].tls is not None
        assert made["edge1"].tls.key != made["edge2"].tls.key
        again = bundles.make_bundle(hub, ensure_passwords(hub), ["grok"], "rediss://hub.example:6380/0", host="edge1")
        assert again.tls == made["edge1"].tls
    finally:
        shutil.rmtree(hub, ignore_errors=True)


def test_bundle_carries_tls_files_when_the_hub_has_a_ca(private_settings: Settings, bundle_file: Path) -> None:
    # Given a hub home with a TLS CA (a copy of the module's hub keys, no Redis needed)
    from xnai_tasks.security.certificates import ensure_ca
    from xnai_tasks.security.tls import TlsFiles

    hub = short_home()
    target = short_home()
    try:
        shutil.copytree(keys_dir(private_settings.home), keys_dir(hub))
        ensure_ca(TlsFiles.of(hub))
        # When a bundle for grok is made for host "edge1" and joined
        made = bundles.make_bundle(hub, ensure_passwords(hub), ["grok"], "rediss://hub.example:6380/0", host="edge1")
        path = hub / "b.json"
        bundles.write_bundle(path, made)
        bundles.join(target, bundles.read_bundle(path))
        # Then the host has the CA and edge1's client certificate and key, each 0600
        files = TlsFiles.of(target)
        assert files.ca.read_text() == TlsFiles.of(hub).ca.read_text()
        assert files.client_cert.read_text() == TlsFiles.of(hub).issued_client("edge1")[0].read_text()
        for p in (files.ca, files.client_cert, files.client_key):
            assert mode_of(p) == 0o600, p
        # And its URL asks for TLS with those files
        url = joined_settings(target).broker_url
        assert url.startswith("rediss://grok:") and f"ssl_ca_certs={files.ca}" in url
    finally:
        shutil.rmtree(hub, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)


def test_a_host_joined_for_two_roles_runs_each_worker_as_its_role(
    private_settings: Settings, private_client: Client, private_app: Celery
) -> None:
    # Given a home joined with one bundle for grok and curation
    hub = private_settings.home
    home = short_home()
    try:
        made = bundles.make_bundle(
            hub, ensure_passwords(hub), ["grok", "curation"], hub_url(private_settings), host="x"
        )
        path = home / "two.json"
        bundles.write_bundle(path, made)
        bundles.join(home, bundles.read_bundle(path))
        settings = joined_settings(home)
        # Then its settings connect as the role a command acts as, else as its first role
        assert settings.joined_roles == ("grok", "curation")
        acting = Settings.from_env({"XNAI_HOME": str(home)}, acting_as="curation")
        assert acting.broker_url.startswith("redis+socket://curation:")
        assert settings.broker_url.startswith("redis+socket://grok:")
        # And `xnai worker curation` there connects as curation and answers the hub's copilot
        proc = start_worker(settings, "curation", concurrency=1)
        try:
            wait_online(proc, private_app, "curation", timeout=120)
            assert private_client.submit("curation", "echo", value="two roles").get(timeout=60) == "two roles"
        finally:
            stop_worker(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---- revocation reaches the joined host (last: it revokes the module's grok key) ----


def test_revocation_on_the_hub_reaches_the_joined_host_within_5_s(
    joined: Settings,
    joined_worker: None,
    joined_app: Celery,
    private_settings: Settings,
    private_client: Client,
    record_property: Any,
) -> None:
    # Given the joined host's grok key, working: a message it signs runs on its worker
    grok = load_signer(joined.home, "grok")
    with admin_connection(private_settings) as admin:
        refused_before = int(admin.hget(c.refused_counter_key("grok"), "revoked_key") or 0)
        # When the hub revokes that key
        done = run_xnai(["keys", "revoke", grok.kid], private_settings)
        revoked_at = time.monotonic()
        assert done.returncode == 0, done.stderr
        assert json.loads(admin.get(c.revoked_keys_key())) == [grok.kid]
        # Then, polled up to 10 s, a message signed by it is refused (revoked_key) by the joined host's worker
        took = None
        while time.monotonic() - revoked_at < REVOCATION_POLL_S:
            publish_raw(joined_app, task="grok.echo", queue=c.queue_for("grok"), kwargs={"value": 1}, signer=grok)
            time.sleep(0.2)
            if int(admin.hget(c.refused_counter_key("grok"), "revoked_key") or 0) > refused_before:
                took = time.monotonic() - revoked_at
                break
    record_property("revocation_refused_after_s", took)
    print(f"revocation reached the joined worker after {took} s")
    assert took is not None, f"no refusal within {REVOCATION_POLL_S} s"
    # And the joined host kept it, for a restart while Redis is away
    assert grok.kid in read_cache(cache_path(joined.home))
    assert Keyring.load(joined.home).status(grok.kid) is KeyStatus.REVOKED
    with pytest.raises(KeyringError, match="has no active key"):  # what a worker started there again loads
        load_signer(joined.home, "grok")
    # And a result the worker still signs with the revoked key is refused by the hub's client
    # (once the 5 s are over: the hub client's keyring looks at its file at most that often, too)
    time.sleep(max(0.0, revoked_at + REFRESH_S + 0.5 - time.monotonic()))
    handle = private_client.submit("grok", "echo", value=3)
    with pytest.raises((TaskTimeoutError, ResultSignatureError)):
        handle.get(timeout=10)
    stored = handle.stored()
    assert stored[SIG_HEADER]["kid"] == grok.kid
    with pytest.raises(ResultSignatureError, match="revoked"):
        verify_result(
            Keyring.load(private_settings.home),
            task_id=handle.id,
            status=stored["status"],
            result=stored["result"],
            signature=stored[SIG_HEADER],
            agent="grok",
        )
