"""One subscription per async client: the results of the tasks it waits on, handed to each task's waiter.

A task's channel is subscribed to once it is sent; once Redis confirms the subscription, what was stored before
it is read (a result published earlier went unheard). No thread and no polling: one reader task per client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from xnai_tasks.client.resp import RespConnection, RespError
from xnai_tasks.errors import BrokerUnreachableError

log = logging.getLogger(__name__)

#: Called with a raw result payload and whether it was published (else read as stored); True: the task is done.
OnPayload = Callable[[bytes, bool], bool]
#: Called when the channel is lost for good, with the error to raise to whoever waits.
OnLost = Callable[[BaseException], None]


class ResultChannel:
    """Subscribes to result keys and dispatches what arrives on them; :meth:`run` is its one reader task."""

    def __init__(self, params: Mapping[str, Any], *, timeout_s: float) -> None:
        self._params = params
        self._timeout_s = timeout_s
        self._sub: RespConnection | None = None
        self._cmd: RespConnection | None = None
        self._send_lock = anyio.Lock()
        self._cmd_lock = anyio.Lock()
        self._watched: dict[str, tuple[OnPayload, OnLost]] = {}
        self._acks: dict[str, anyio.Event] = {}
        self._lost: BaseException | None = None
        #: Keys whose stored value a waiter wants now (read together by whoever gets the connection first).
        self._waiting: set[str] = set()
        self._read: dict[str, Any] = {}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, then read messages until cancelled or the connection is lost (every waiter is then told)."""
        try:
            self._sub = await RespConnection.open(self._params, timeout_s=self._timeout_s)
            self._cmd = await RespConnection.open(self._params, timeout_s=self._timeout_s)
        except BaseException:
            await self._close()
            raise
        task_status.started()
        try:
            while True:
                await self._dispatch(await self._sub.read())
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._lose(BrokerUnreachableError(f"lost the result channel: {exc or type(exc).__name__}"))
        except BrokerUnreachableError as exc:
            self._lose(exc)
        finally:
            await self._close()

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            for conn in (self._sub, self._cmd):
                if conn is not None:
                    await conn.aclose()

    async def watch(self, key: str, on_payload: OnPayload, on_lost: OnLost) -> None:
        """Hand every result on ``key`` to ``on_payload`` from now on, and the one already stored, if any."""
        if self._lost is not None:
            raise self._lost
        assert self._sub is not None, "the channel is not running"
        self._watched[key] = (on_payload, on_lost)
        ack = self._acks[key] = anyio.Event()
        await self._send("SUBSCRIBE", key)
        await ack.wait()
        if self._lost is not None:
            raise self._lost
        stored = await self._get(key)
        if stored is not None and key in self._watched and on_payload(stored, False):
            await self.forget(key)

    async def forget(self, key: str) -> None:
        """Stop listening on ``key``."""
        if self._watched.pop(key, None) is None or self._lost is not None or self._sub is None:
            return
        await self._send("UNSUBSCRIBE", key)

    async def _get(self, key: str) -> bytes | None:
        """The stored value of ``key``: whoever gets the connection first reads every key asked for meanwhile."""
        assert self._cmd is not None
        self._waiting.add(key)
        try:
            async with self._cmd_lock:
                if key not in self._read:
                    keys = [k for k in self._waiting if k not in self._read]
                    values = await self._mget(keys)
                    # keys whose reader gave up (cancelled) while this read ran are not kept
                    self._read.update((k, v) for k, v in zip(keys, values, strict=True) if k in self._waiting)
        finally:  # read or not (cancelled), nothing of this key is kept
            self._waiting.discard(key)
            value = self._read.pop(key, None)
        return value if isinstance(value, bytes) else None

    async def _mget(self, keys: list[str]) -> list[Any]:
        """Shielded: a reply read halfway would leave the connection out of step."""
        assert self._cmd is not None
        try:
            with anyio.fail_after(self._timeout_s, shield=True):
                values = await self._cmd.command("MGET", *keys)
        except (RespError, TimeoutError, OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            self._lost = BrokerUnreachableError(f"result channel: could not read results: {exc}")
            raise self._lost from None
        return values if isinstance(values, list) and len(values) == len(keys) else [None] * len(keys)

    async def _send(self, *args: str) -> None:
        """Shielded: a command written halfway would leave the connection out of step."""
        assert self._sub is not None
        async with self._send_lock:
            with anyio.CancelScope(shield=True):
                await self._sub.send(*args)

    async def _dispatch(self, message: Any) -> None:
        if isinstance(message, RespError):  # SUBSCRIBE refused (ACL): nothing would ever arrive
            raise BrokerUnreachableError(f"result channel: Redis refused a subscription: {message}")
        if not isinstance(message, list) or len(message) < 3:
            return
        kind, channel = message[0], message[1]
        key = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == b"subscribe":
            ack = self._acks.pop(key, None)
            if ack is not None:
                ack.set()
        elif kind == b"message" and isinstance(message[2], bytes):
            watcher = self._watched.get(key)
            if watcher is not None and watcher[0](message[2], True):
                await self.forget(key)

    def _lose(self, error: BaseException) -> None:
        log.warning("%s", error)
        self._lost = error
        for ack in self._acks.values():
            ack.set()
        for _, on_lost in list(self._watched.values()):
            on_lost(error)
        self._watched.clear()
