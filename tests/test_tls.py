"""TLS between hosts: ``xnai tls init``, the TLS terminator in front of the embedded Redis (mutual TLS), and every
client path on a ``rediss://`` URL (a real worker, the sync and async clients, redis-py with ACLs). Refusals are
forced one by one and their one log line checked."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import redis

from xnai_tasks import AsyncClient
from xnai_tasks.bench.harness import start_worker, stop_worker, wait_online
from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import BrokerUnreachableError, ProcessError, SettingsError, UsageError
from xnai_tasks.ops import tls_proxy
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.ops.tls_proxy import ProxyThread, TlsProxy
from xnai_tasks.security import acl, certificates
from xnai_tasks.security.key_store import keys_dir
from xnai_tasks.security.password_file import ensure_passwords
from xnai_tasks.security.tls import TlsFiles, server_context
from xnai_tasks.settings import Settings

from support import admin_connection, free_port, lazy_settings, run_xnai, short_home

PING = b"*1\r\n$4\r\nPING\r\n"
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def server() -> Iterator[Settings]:
    """The Redis host: certificates from ``xnai tls init``, the embedded Redis and its TLS terminator on loopback."""
    settings = lazy_settings(redis_tls_port=free_port(), redis_tls_bind=LOOPBACK)
    done = run_xnai(["tls", "init", "--host", LOOPBACK, "--client", "remote"], settings)
    assert done.returncode == 0, done.stderr
    with Stack(settings, roles=(), flower=False, output_dir=settings.home / "out"):
        wait_listening(settings.redis_tls_port or 0)
        yield settings
    shutil.rmtree(settings.home, ignore_errors=True)


@pytest.fixture(scope="module")
def remote_home(server: Settings) -> Iterator[Path]:
    """Another host's XNAI_HOME: the CA, the client certificate made for it, and the keyring; no Redis of its own."""
    home = short_home()
    files, mine = TlsFiles.of(server.home), TlsFiles.of(home)
    mine.folder.mkdir(mode=0o700)
    cert, key = files.issued_client("remote")
    shutil.copy2(files.ca, mine.ca)
    shutil.copy2(cert, mine.client_cert)
    shutil.copy2(key, mine.client_key)
    shutil.copytree(keys_dir(server.home), keys_dir(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def remote(server: Settings, home: Path, user: str) -> Settings:
    """Settings of a process on the other host connecting as ``user`` through the TLS port."""
    password = ensure_passwords(server.home)[user]
    url = f"rediss://{user}:{password}@{LOOPBACK}:{server.redis_tls_port}/0"
    return replace(server, home=home, redis_url=url, redis_tls_port=None)


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def log_lines(settings: Settings, needle: str, timeout: float = 15.0) -> list[str]:
    """The messages of XNAI_HOME's JSON log containing ``needle``, once there is one (or after ``timeout``)."""
    path = settings.log_dir / "xnai.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        found = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                msg = str(json.loads(line).get("msg", ""))
                if needle in msg:
                    found.append(msg)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def tls_exchange(port: int, context: ssl.SSLContext, payload: bytes = PING) -> tuple[bytes, int]:
    """Send ``payload`` over TLS; what came back (b"" when refused) and our local port (the proxy's log names it)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    local_port = raw.getsockname()[1]
    reply = b""
    try:
        with context.wrap_socket(raw, server_hostname=LOOPBACK) as conn:
            conn.sendall(payload)
            reply = conn.recv(4096)
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        raw.close()
    return reply, local_port


# ---- xnai tls init and the files ----


def test_tls_init_makes_the_ca_and_certificates_with_private_keys(server: Settings) -> None:
    # Given the home `xnai tls init --host 127.0.0.1 --client remote` ran on
    files = TlsFiles.of(server.home)
    # Then every key is mode 0600 and every certificate is signed by the CA
    for key in (files.ca_key, files.server_key, files.client_key, files.issued_client("remote")[1]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = certificates.load_certificate(files.ca)
    for cert in (files.server_cert, files.client_cert, files.issued_client("remote")[0]):
        certificates.load_certificate(cert).verify_directly_issued_by(ca)
    # And the server certificate names the given address, localhost and 127.0.0.1
    assert "localhost" in certificates.describe(files.server_cert)
    assert "127.0.0.1" in certificates.describe(files.server_cert)


def test_tls_init_again_keeps_the_ca_and_client_makes_another_certificate(server: Settings) -> None:
    # Given the CA made by the first init
    files = TlsFiles.of(server.home)
    ca_before = files.ca.read_bytes()
    # When init runs again with another host name, and a client certificate is made for one more host
    again = run_xnai(["tls", "init", "--host", "127.0.0.1", "--host", "redis.lan"], server)
    more = run_xnai(["tls", "client", "hostc"], server)
    # Then the CA is kept, the server certificate names the new host, and hostc has a certificate of its own
    assert again.returncode == 0 and more.returncode == 0, again.stderr + more.stderr
    assert "kept" in again.stdout and files.ca.read_bytes() == ca_before
    assert "redis.lan" in certificates.describe(files.server_cert)
    cert, key = files.issued_client("hostc")
    certificates.load_certificate(cert).verify_directly_issued_by(certificates.load_certificate(files.ca))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_tls_init_refuses_a_bad_host_and_a_host_without_the_ca_key(remote_home: Path) -> None:
    # Given a joining host's home: the CA certificate but not its key
    env = {"XNAI_HOME": str(remote_home)}
    # When it is asked to make certificates, or given a host name that is none
    no_key = run_xnai(["tls", "client", "hostd"], env=env)
    bad_host = run_xnai(["tls", "init", "--host", "not a host!"], env={"XNAI_HOME": str(short_home())})
    # Then each is one line, exit 2
    assert no_key.returncode == 2 and "has no key beside it" in no_key.stderr, no_key.stderr
    assert bad_host.returncode == 2 and "neither a host name nor an IP address" in bad_host.stderr
    assert len(no_key.stderr.strip().splitlines()) == 1 and len(bad_host.stderr.strip().splitlines()) == 1


def test_the_terminator_without_certificates_is_one_line(home: Path) -> None:
    # Given XNAI_REDIS_TLS_PORT on a home where xnai tls init never ran
    settings = Settings(home=home, redis_tls_port=free_port(), redis_tls_bind=LOOPBACK)
    # When the terminator is built, by xnai up's stack or xnai tls serve
    with pytest.raises(UsageError) as err:
        Stack(settings, roles=(), flower=False).start()
    served = run_xnai(["tls", "serve"], settings, timeout=30)
    # Then it names the missing file and what to run
    assert "ca.pem is missing: run xnai tls init first" in str(err.value)
    assert served.returncode == 2 and "run xnai tls init first" in served.stderr, served.stderr


def test_bad_tls_settings_are_refused(home: Path) -> None:
    # Given a TLS port out of range, or a bind address that is neither an address nor a name
    for name, value in (("XNAI_REDIS_TLS_PORT", "70000"), ("XNAI_REDIS_TLS_BIND", "not an address")):
        # When settings are read, Then one line names the variable
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({"XNAI_HOME": str(home), name: value})


# ---- every client path on rediss:// ----


def test_a_real_task_runs_through_a_real_worker_over_tls(server: Settings, remote_home: Path) -> None:
    # Given a curation worker and a client on the other host, both on rediss:// URLs through the terminator
    worker_settings = remote(server, remote_home, "curation")
    client_settings = remote(server, remote_home, acl.DEFAULT_USER)
    app = create_app(client_settings, main="xnai_test_tls")
    proc = start_worker(worker_settings, "curation", concurrency=1)
    try:
        wait_online(proc, app, "curation", timeout=120)
        # When the client submits a task and waits for its result
        client = Client(client_settings)
        try:
            result = client.submit("curation", "echo", value="over tls").get(timeout=60)
        finally:
            client.close()
        # Then the worker ran it and the signed result came back
        assert result == "over tls"
        # And the only curation connections Redis has are the other host's, which came in through the terminator
        with admin_connection(server) as admin:
            assert any(client["user"] == "curation" for client in admin.client_list())
        # And the async client, on its own RESP connection, gets results over TLS too
        assert anyio.run(async_echo, client_settings) == "async over tls"
    finally:
        stop_worker(proc)
        app.close()


async def async_echo(settings: Settings) -> object:
    async with AsyncClient(settings) as client:
        handle = await client.submit("curation", "echo", value="async over tls")
        with anyio.fail_after(60):
            return await handle.get()


def test_redis_py_over_tls_keeps_the_acls(server: Settings, remote_home: Path) -> None:
    # Given a redis-py connection through the terminator as the cline user, and one with a wrong password
    url = remote(server, remote_home, "cline").broker_url
    conn = broker.connect(url)
    wrong = broker.connect(url.replace(ensure_passwords(server.home)["cline"], "not-the-password"), retries=0)
    try:
        # When each pings, and cline tries what its ACL does not allow
        assert conn.ping()
        # Then Redis' ACLs still decide
        with pytest.raises(redis.exceptions.NoPermissionError):
            conn.flushall()
        with pytest.raises(redis.exceptions.AuthenticationError):
            wrong.ping()
    finally:
        conn.close()
        wrong.close()


def test_flowers_broker_client_uses_tls_from_the_app_config(server: Settings, remote_home: Path) -> None:
    from flower.utils.broker import Broker

    # Given the Celery app of Flower on the other host (its flower user's rediss:// URL)
    app = create_app(remote(server, remote_home, acl.FLOWER), main="xnai_test_tls_flower")
    try:
        # When Flower builds its broker client as its Broker page does (from broker_use_ssl)
        flower_broker = Broker(
            app.connection().as_uri(include_password=True),
            broker_options=app.conf.broker_transport_options,
            broker_use_ssl=app.conf.broker_use_ssl,
        )
        # Then it verifies the server with the CA, shows this host's client certificate, and Redis answers
        assert app.conf.broker_use_ssl["ssl_ca_certs"] == str(TlsFiles.of(remote_home).ca)
        assert app.conf.redis_backend_use_ssl["ssl_certfile"] == str(TlsFiles.of(remote_home).client_cert)
        assert asyncio.run(ping_and_close(flower_broker.redis))
    finally:
        app.close()


async def ping_and_close(conn: Any) -> bool:
    try:
        return bool(await conn.ping())
    finally:
        await conn.aclose()


def test_a_client_that_does_not_trust_the_ca_fails_in_one_line(server: Settings) -> None:
    # Given a host whose ca.pem is another CA (with a client certificate of that CA)
    home = short_home()
    try:
        other = TlsFiles.of(home)
        certificates.issue_client(other, "stranger", cert_path=other.client_cert, key_path=other.client_key)
        settings = remote(server, home, acl.DEFAULT_USER)
        # When a command connects to the Redis host
        with pytest.raises(BrokerUnreachableError) as err:
            broker.require_reachable(settings)
        done = run_xnai(["status"], settings, timeout=60)
        # Then it is exit 6 and one line naming the failed certificate check, without the password
        assert "certificate verify failed" in str(err.value) and "is not trusted by" in str(err.value)
        assert done.returncode == 6, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "certificate verify failed" in done.stderr
        assert ensure_passwords(server.home)[acl.DEFAULT_USER] not in done.stderr
        # And the terminator logged why it closed the connection
        assert log_lines(server, "the client does not trust this server's certificate")
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---- refusals at the terminator ----


def test_a_host_name_the_server_certificate_does_not_carry_fails_in_one_line(
    server: Settings, remote_home: Path
) -> None:
    # Given a terminator reached at 127.0.0.2, an address its certificate (127.0.0.1, localhost) does not name
    proxy = TlsProxy(
        bind="127.0.0.2",
        port=free_port(),
        socket_path=server.redis_socket,
        context=server_context(TlsFiles.of(server.home)),
    )
    thread = ProxyThread(proxy).start()
    try:
        url = remote(server, remote_home, acl.DEFAULT_USER).broker_url.replace(
            f"{LOOPBACK}:{server.redis_tls_port}", f"127.0.0.2:{proxy.port}"
        )
        # When a client connects there
        with pytest.raises(BrokerUnreachableError) as err:
            broker.require_reachable(replace(server, home=remote_home, redis_url=url, redis_tls_port=None))
        # Then the one line says the certificate does not name that host, and what to do
        assert "certificate verify failed" in str(err.value)
        assert "does not name this host: xnai tls init --host NAME" in str(err.value)
    finally:
        thread.stop()


def test_a_plain_connection_is_refused_without_a_redis_reply(server: Settings) -> None:
    # Given the terminator of `xnai up`
    assert server.redis_tls_port is not None
    # When a plain TCP client sends PING
    with socket.create_connection((LOOPBACK, server.redis_tls_port), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(PING)
        reply = sock.recv(4096)
    # Then the connection is closed with no Redis reply, and one line says why
    assert reply == b""
    lines = log_lines(server, f"refused 127.0.0.1:{local_port}:")
    reason = "not TLS: a plain-text connection (14 bytes, a Redis command (RESP))"
    assert lines == [f"tls proxy: refused 127.0.0.1:{local_port}: {reason}"], lines


def test_a_plain_inline_auth_is_refused_without_logging_its_bytes(server: Settings) -> None:
    # Given the terminator of `xnai up`, and a telnet-like client typing an inline AUTH with a password
    assert server.redis_tls_port is not None
    secret = b"AUTH grok s3cret-in-clear\r\n"
    # When it sends it in plain text
    with socket.create_connection((LOOPBACK, server.redis_tls_port), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(secret)
        reply = sock.recv(4096)
    # Then it is refused in one line giving the byte count and kind, and no byte of what it sent
    assert reply == b""
    lines = log_lines(server, f"refused 127.0.0.1:{local_port}:")
    reason = f"not TLS: a plain-text connection ({len(secret)} bytes, an inline command)"
    assert lines == [f"tls proxy: refused 127.0.0.1:{local_port}: {reason}"], lines
    log_text = (server.log_dir / "xnai.jsonl").read_text(encoding="utf-8")
    assert "s3cret" not in log_text and "AUTH grok" not in log_text


@pytest.mark.parametrize(
    ("opening", "kind"),
    [
        (PING, "a Redis command (RESP)"),
        (b"$4\r\n", "a Redis command (RESP)"),
        (b"PING\r\n", "an inline command"),
        (b"auth secret\r\n", "an inline command"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP"),
        (b"PRI * HTTP/2.0\r\n", "HTTP"),
        (b"\x00\x01secret", "unrecognised"),
    ],
)
def test_a_plain_text_opening_is_named_by_its_kind(opening: bytes, kind: str) -> None:
    # Given what a plain-text client sent first; When the terminator names it; Then it is its kind, never its bytes
    assert tls_proxy.plain_text_kind(opening) == kind


def test_a_tls_client_without_a_certificate_is_refused(server: Settings) -> None:
    # Given a TLS client that trusts the CA but has no client certificate
    assert server.redis_tls_port is not None
    context = client_context(TlsFiles.of(server.home).ca)
    # When it sends PING
    reply, local_port = tls_exchange(server.redis_tls_port, context)
    # Then no Redis reply comes back, and one line says why
    assert b"PONG" not in reply and b"NOAUTH" not in reply
    lines = log_lines(server, f"refused 127.0.0.1:{local_port}:")
    assert lines == [f"tls proxy: refused 127.0.0.1:{local_port}: no client certificate"], lines


def test_a_client_certificate_of_another_ca_is_refused(server: Settings) -> None:
    # Given a client certificate signed by some other CA
    home = short_home()
    try:
        other = TlsFiles.of(home)
        cert = certificates.issue_client(other, "intruder")
        context = client_context(TlsFiles.of(server.home).ca, cert, other.issued_client("intruder")[1])
        # When it connects and sends PING
        assert server.redis_tls_port is not None
        reply, local_port = tls_exchange(server.redis_tls_port, context)
        # Then no Redis reply, and one line says why
        assert b"PONG" not in reply and b"NOAUTH" not in reply
        lines = log_lines(server, f"refused 127.0.0.1:{local_port}:")
        assert len(lines) == 1 and "its client certificate is not signed by this CA" in lines[0], lines
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_a_client_below_tls_1_2_is_refused(server: Settings) -> None:
    # Given a client that offers TLS 1.0 and 1.1 only (if this OpenSSL still can)
    files = TlsFiles.of(server.home)
    context = client_context(files.ca, files.client_cert, files.client_key)
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    assert server.redis_tls_port is not None
    # When it connects
    reply, local_port = tls_exchange(server.redis_tls_port, context)
    lines = log_lines(server, f"refused 127.0.0.1:{local_port}:", timeout=5)
    if not lines:
        pytest.skip("this OpenSSL sent no TLS 1.1 hello")
    # Then no Redis reply, and one line says why
    assert reply == b""
    assert len(lines) == 1 and "a TLS version below 1.2" in lines[0], lines


@pytest.fixture
def own_proxy(server: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyThread]:
    """A second terminator in this process (a short handshake timeout; Redis at a socket nobody listens on)."""
    monkeypatch.setattr(tls_proxy, "HANDSHAKE_TIMEOUT_S", 0.5)
    proxy = TlsProxy(
        bind=LOOPBACK,
        port=free_port(),
        socket_path=server.home / "nobody.sock",
        context=server_context(TlsFiles.of(server.home)),
    )
    thread = ProxyThread(proxy).start()
    yield thread
    thread.stop()


def test_a_silent_client_is_refused_after_the_handshake_timeout(
    own_proxy: ProxyThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=tls_proxy.__name__)
    # Given a TCP client that never starts a handshake
    with socket.create_connection((LOOPBACK, own_proxy.proxy.port), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        # When the handshake timeout passes, Then the terminator closes it, in one line
        assert sock.recv(16) == b""
    assert f"tls proxy: refused 127.0.0.1:{local_port}: no TLS handshake within 0.5 s" in caplog.messages


def test_redis_unreachable_behind_the_terminator_is_one_line(
    server: Settings, own_proxy: ProxyThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=tls_proxy.__name__)
    # Given a terminator whose Redis socket does not answer, and a client with a good certificate
    files = TlsFiles.of(server.home)
    context = client_context(files.ca, files.client_cert, files.client_key)
    # When the client connects
    reply, _ = tls_exchange(own_proxy.proxy.port, context)
    # Then it is closed and one line says Redis cannot be reached
    assert reply == b""
    deadline = time.monotonic() + 5
    while not any("cannot reach Redis" in m for m in caplog.messages) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("cannot reach Redis at" in m and "nobody.sock" in m for m in caplog.messages), caplog.messages
    # And the connecting task, held by the proxy while in flight, is let go once done
    deadline = time.monotonic() + 5
    while own_proxy.proxy.tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not own_proxy.proxy.tasks


def test_a_taken_port_is_one_line(server: Settings) -> None:
    # Given the port the running terminator holds
    assert server.redis_tls_port is not None
    proxy = TlsProxy(
        bind=LOOPBACK,
        port=server.redis_tls_port,
        socket_path=server.redis_socket,
        context=server_context(TlsFiles.of(server.home)),
    )
    # When a second terminator tries to listen on it, Then it is one line naming the address
    with pytest.raises(ProcessError, match=f"cannot listen on 127.0.0.1:{server.redis_tls_port}"):
        ProxyThread(proxy).start()


def test_xnai_redis_runs_the_terminator_beside_redis() -> None:
    # Given a fresh home with certificates and XNAI_REDIS_TLS_PORT (the Procfile's `redis` line, under honcho)
    settings = lazy_settings(redis_tls_port=free_port(), redis_tls_bind=LOOPBACK)
    try:
        assert run_xnai(["tls", "init"], settings).returncode == 0
        proc = subprocess.Popen(
            [*_xnai_argv(), "redis"],
            env=_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            # When a client with this host's certificate connects as admin
            assert settings.redis_tls_port is not None
            wait_listening(settings.redis_tls_port)
            conn = broker.connect(remote(settings, settings.home, acl.ADMIN).broker_url)
            try:
                # Then Redis answers through TLS
                assert conn.ping()
            finally:
                conn.close()
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        shutil.rmtree(settings.home, ignore_errors=True)


def _xnai_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "xnai_tasks"]


def _env(settings: Settings) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
    return env | settings.to_env()


def test_the_terminator_wrote_no_traceback(server: Settings) -> None:
    # Given every refusal above went through the terminator `xnai up` runs
    output = (server.home / "out" / "tls.out").read_text(encoding="utf-8", errors="replace")
    # Then it said where it serves, and no connection made it fail
    assert "tls: serving 127.0.0.1:" in output
    assert "Traceback" not in output and "Error" not in output.replace("BrokerUnreachableError", ""), output


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []


class _Lines:
    """A process's stdout, read in a thread (a silent process cannot block the test)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in proc.stdout or []], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.lines.get(timeout=0.5))
            except queue.Empty:
                assert self.proc.poll() is None, f"exited early: {self.seen[-20:]}"
                continue
            if text in self.seen[-1]:
                return self.seen[-1]
        raise AssertionError(f"no {text!r} within {timeout} s: {self.seen[-20:]}")


def test_xnai_up_runs_the_terminator_restarts_it_and_stops_it() -> None:
    # Given `xnai up` with XNAI_REDIS_TLS_PORT on a home with certificates
    settings = lazy_settings(redis_tls_port=free_port(), redis_tls_bind=LOOPBACK, flower_port=free_port())
    assert run_xnai(["tls", "init"], settings).returncode == 0
    proc = subprocess.Popen(
        [*_xnai_argv(), "up", "--no-flower", "--roles", "curation"],
        env=_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    out = _Lines(proc)
    try:
        out.wait_for(f"redis tls 127.0.0.1:{settings.redis_tls_port} (mutual TLS)")
        out.wait_for("xnai up: ready")
        started = psutil.Process(proc.pid).children(recursive=True)
        terminator = [p for p in started if _cmdline(p)[-2:] == ["tls", "serve"]]
        assert len(terminator) == 1
        admin_over_tls = remote(settings, settings.home, acl.ADMIN).broker_url
        # When the terminator is killed
        terminator[0].kill()
        # Then xnai up says so, starts it again, and TLS clients get through once more
        out.wait_for("xnai up: tls exited (killed by SIGKILL)")
        out.wait_for("xnai up: tls restarted")
        deadline = time.monotonic() + 30
        while True:
            conn = broker.connect(admin_over_tls, retries=0)
            try:
                assert conn.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            finally:
                conn.close()
        # And SIGTERM stops everything, the terminator included
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [_cmdline(p) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(settings.home, ignore_errors=True)
