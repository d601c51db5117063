"""The door before the gate: a raw queue item that is not a well-formed kombu envelope never reaches Celery.

Any role can LPUSH anything into its own queue. kombu's Redis channel decodes what it pops and builds a
message from it; an item that is not JSON, or JSON without the envelope's fields (``properties``, a
``delivery_tag``, headers as an object, a base64 body), makes kombu raise inside the worker's event loop,
which stops the worker (and, in older setups, cancelled and restored the task it was running).
:class:`GuardedChannel` checks each popped item first: a malformed one is refused in one WARNING line,
counted as ``malformed`` and kept raw in the role's dead-letter list; every other item goes on as before.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from xnai_tasks.core.channel_client import ReusedClientChannel
from xnai_tasks.errors import MessageRejected
from xnai_tasks.security import limits
from xnai_tasks.security.refusal import Reason
from xnai_tasks.worker.dead_letters import dead_letter

log = logging.getLogger(__name__)

#: More headers than any Celery message has (protocol 2 uses about 20).
MAX_HEADERS = 128
#: The JSON envelope around the largest accepted body (base64 makes it a third bigger).
MAX_ENVELOPE_BYTES = limits.MAX_BODY_BYTES * 2


def _malformed(detail: str) -> MessageRejected:
    return MessageRejected(Reason.MALFORMED, detail)


def decode_envelope(text: str) -> Any:
    """The JSON of a raw queue item, if it is small enough and JSON at all; ``malformed`` otherwise."""
    if len(text) > MAX_ENVELOPE_BYTES:
        raise _malformed(f"the envelope is {len(text)} bytes, more than {MAX_ENVELOPE_BYTES}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _malformed("the envelope is not JSON") from None


def check_envelope(payload: Any) -> dict[str, Any]:
    """A decoded queue item, if it is a kombu message envelope a worker can take; ``malformed`` otherwise."""
    if not isinstance(payload, dict):
        raise _malformed(f"the envelope is a JSON {type(payload).__name__}, not an object")
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        raise _malformed("the envelope has no properties object")
    if not isinstance(properties.get("delivery_tag"), str):
        raise _malformed("the envelope has no delivery tag")
    if not isinstance(properties.get("delivery_info", {}), dict):
        raise _malformed("delivery_info is not an object")
    headers = payload.get("headers")
    if not isinstance(headers, dict):
        raise _malformed(f"headers are a {type(headers).__name__}, not an object")
    if len(headers) > MAX_HEADERS:
        raise _malformed(f"{len(headers)} headers, more than {MAX_HEADERS}")
    if payload.get("content-type") != "application/json":
        raise _malformed(f"content type {str(payload.get('content-type'))[:60]!r} is not application/json")
    _check_body(payload.get("body"), properties.get("body_encoding"))
    return payload


def _check_body(body: Any, encoding: Any) -> None:
    if not isinstance(body, str):
        raise _malformed("the body is not a string")
    if encoding == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise _malformed("the body is not base64") from None
    elif encoding is not None:
        raise _malformed(f"unknown body encoding {str(encoding)[:30]!r}")


class GuardedChannel(ReusedClientChannel, kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, checking each item it pops from a queue before building a message of it (one client
    per pool for what it sends outside its event loop: unacked records, acks)."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnect on the next poll, as kombu does
                raise
            if not reply:
                raise Empty()
            key, item = reply
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload = self._admit(queue, item)
            if payload is not None:
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _admit(self, queue: str, item: bytes) -> dict[str, Any] | None:
        """The decoded envelope, or None when it was refused (and dead-lettered)."""
        text = bytes_to_str(item)
        payload: Any = None
        try:
            payload = decode_envelope(text)
            return check_envelope(payload)
        except MessageRejected as refusal:
            headers = payload.get("headers") if isinstance(payload, dict) else None
            self._refuse(queue, refusal, text, headers if isinstance(headers, dict) else {})
            return None

    def _refuse(self, queue: str, refusal: MessageRejected, raw: str, headers: dict[str, Any]) -> None:
        task_id = str(headers.get("id", "?"))[:64]
        log.warning(
            "refused queue item %s on %s (%s): %s",
            task_id,
            queue,
            refusal.reason,
            refusal.detail,
            extra={"event": "message_refused", "reason": refusal.reason, "role": queue, "task_id": task_id},
        )
        try:
            with self.conn_or_acquire() as client:
                dead_letter(
                    client,
                    queue,
                    reason=refusal.reason,
                    detail=refusal.detail,
                    task_id=task_id,
                    headers={k: headers[k] for k in list(headers)[:MAX_HEADERS]},
                    delivery_info={},
                    body=raw,
                )
        except redis.RedisError as exc:
            log.warning("could not keep the refused queue item: %s", exc)


def guard(connection: Any) -> Any:
    """Make a kombu connection on the Redis transport use :class:`GuardedChannel`; return it."""
    transport = connection.transport
    if isinstance(transport, kombu_redis.Transport):
        transport.Channel = GuardedChannel
    return connection
