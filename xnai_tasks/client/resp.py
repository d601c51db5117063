"""A minimal Redis connection on AnyIO streams (RESP2): enough to subscribe to result channels and read keys.

redis-py's asyncio client runs on asyncio only; this one runs on asyncio and trio alike. It speaks only what
the async client needs: AUTH, SELECT, SUBSCRIBE, UNSUBSCRIBE, MGET and the replies and messages they bring.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream

from xnai_tasks.errors import BrokerUnreachableError
from xnai_tasks.security.tls import client_context

_CRLF = b"\r\n"
#: The longest line (simple string, integer, length) a reply may have.
_MAX_LINE = 65536


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``)."""


#: A RESP2 reply: a simple string, an integer, a bulk string (None: nil), an array of replies, or an error.
Reply = bytes | int | None | list[Any] | RespError


class RespConnection:
    """One Redis connection: send commands, read replies (and, once subscribed, pushed messages)."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    @classmethod
    async def open(cls, params: Mapping[str, Any], *, timeout_s: float) -> RespConnection:
        """Connect as Celery's Redis backend does (its ``connparams``: socket path or host and port, user, db)."""
        try:
            with anyio.fail_after(timeout_s):
                stream = await _connect(params)
                conn = cls(stream)
                await conn._handshake(params)
        except (OSError, TimeoutError, RespError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            raise BrokerUnreachableError(f"result channel: could not connect to Redis: {exc}") from None
        return conn

    async def _handshake(self, params: Mapping[str, Any]) -> None:
        password, username = params.get("password"), params.get("username")
        if password:
            await self.command(*(("AUTH", username, password) if username else ("AUTH", password)))
        if int(params.get("db") or 0):
            await self.command("SELECT", str(params["db"]))

    async def command(self, *args: str | bytes) -> Reply:
        """Send one command and read its reply; RespError for an error reply."""
        await self.send(*args)
        reply = await self.read()
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def send(self, *args: str | bytes) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        await self._stream.send(b"".join(parts))

    async def read(self) -> Reply:
        """The next reply or pushed message."""
        line = await self._reader.receive_until(_CRLF, _MAX_LINE)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return bytes(rest)
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = await self._reader.receive_exactly(size + 2)
            return bytes(data[:-2])
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [await self.read() for _ in range(size)]
        raise BrokerUnreachableError(f"result channel: unexpected reply from Redis: {bytes(line[:40])!r}")

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _connect(params: Mapping[str, Any]) -> ByteStream:
    path = params.get("path")
    if path:
        return await anyio.connect_unix(str(path))
    tls = params.get("ssl_cert_reqs") is not None or "SSL" in getattr(params.get("connection_class"), "__name__", "")
    # rediss://: the CA, client certificate and checks of the backend's own parameters (xnai_tasks.security.tls)
    context = client_context(params) if tls else None
    host = str(params.get("host") or "localhost")
    port = int(params.get("port") or 6379)
    if context is None:
        return await anyio.connect_tcp(host, port)
    return await anyio.connect_tcp(host, port, ssl_context=context, tls_standard_compatible=False)
