"""Signed remote control: Celery's broadcast commands, and the replies to them, carry Ed25519 signatures.

Celery's remote control is a kombu mailbox (``celery.pidbox``): anyone who may publish to its broadcast
channel, which every role's Redis user must be able to subscribe to, could shut workers down, resize
their pools, cancel their queues or revoke other roles' tasks. So it is gated like the task consumer:

* :class:`SignedMailbox` signs every command it publishes (method, arguments, destination, reply
  address, a timestamp and a nonce) with the agent of the process, and every reply a worker sends.
* :class:`GatedNode`, the worker's end of the mailbox, runs a command only when it is signed by a key in
  the keyring, by an agent allowed that kind of command (``control``: the copilot only; ``inspect``:
  the copilot and Flower), fresh (:data:`MAX_AGE_S`), and not seen before (a nonce ledger per role). A
  refused command is logged in one line, counted under ``control_<reason>`` and dead-lettered.
* The sender's :meth:`SignedMailbox._collect` keeps only replies signed by the role the replying node
  is named after, so a forged ``pong`` cannot make a dead role look alive.

Replies are scrubbed of the worker's Redis password (``inspect stats`` reports the broker connection).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any, ClassVar

import redis
from celery.app.control import Control
from kombu import Consumer, Exchange
from kombu.common import maybe_declare
from kombu.exceptions import InconsistencyError
from kombu.pidbox import Mailbox, Node

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected, XnaiError
from xnai_tasks.security.control_signature import (
    VerifiedControl,
    sign_control,
    sign_reply,
    verify_control,
    verify_reply,
)
from xnai_tasks.security.key_pair import Signer
from xnai_tasks.security.keyring import Keyring, SignerSource, shared_keyring
from xnai_tasks.security.redaction import scrub, url_password
from xnai_tasks.security.refusal import Reason
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.worker.dead_letters import dead_letter

log = logging.getLogger(__name__)

#: Agents that may send commands that change a worker (shutdown, pool_grow, revoke, rate_limit, ...).
CONTROL_AGENTS = frozenset({"copilot"})
#: Agents that may send commands that only read (ping, stats, active, registered, ...): Flower too.
INSPECT_AGENTS = frozenset({"copilot", "flower"})
#: Control commands any inspect agent may send: Flower turns on, every few seconds, the events that the
#: workers send anyway, and its event receiver asks every worker for a heartbeat event when it starts
#: (Celery's ``wakeup_workers``). Refusing them would fill every role's dead letters with noise.
HARMLESS_CONTROL = frozenset({"enable_events", "heartbeat"})
#: A command older than this is refused (commands are immediate; their replies wait a second or so).
MAX_AGE_S = 60.0


def command_kind(method: Any) -> str | None:
    """``inspect`` or ``control`` for a method of Celery's worker control panel; None for an unknown one."""
    from celery.worker.control import Panel

    meta = Panel.meta.get(method) if isinstance(method, str) else None
    return None if meta is None else str(meta.type)


class ControlGate:
    """The checks a worker runs on a control command before its node dispatches it."""

    def __init__(self, keyring: Keyring, conn: redis.Redis, role: str) -> None:
        self.keyring = keyring
        self.conn = conn
        self.role = role

    def check(self, body: Any, headers: dict[str, Any], node: str = "") -> VerifiedControl:
        """Who signed the command, when it may run on ``node``; :class:`MessageRejected` saying why not otherwise."""
        if not isinstance(body, dict):
            raise MessageRejected(Reason.MALFORMED, "control body is not an object")
        method = body.get("method")
        kind = command_kind(method)
        if kind is None:
            raise MessageRejected(Reason.MALFORMED, f"unknown control command {str(method)[:60]!r}")
        verified = verify_control(
            self.keyring, body=body, signature=headers.get(SIG_HEADER), now=time.time(), max_age_s=MAX_AGE_S
        )
        allowed = INSPECT_AGENTS if kind == "inspect" or method in HARMLESS_CONTROL else CONTROL_AGENTS
        if verified.agent not in allowed:
            raise MessageRejected(Reason.NOT_AUTHORIZED, f"{verified.agent} may not send the {kind} command {method}")
        # one ledger entry per node: every worker of the role (one per host) runs a broadcast once, a copy never
        key = c.control_nonce_key(self.role, f"{node}:{verified.nonce}" if node else verified.nonce)
        if not self.conn.set(key, b"1", nx=True, ex=int(2 * MAX_AGE_S) + 60):
            raise MessageRejected(Reason.REPLAY, f"control command {method} with a nonce already used")
        return verified

    def refuse(self, body: Any, headers: dict[str, Any], refusal: MessageRejected) -> None:
        """One WARNING line, a count under ``control_<reason>``, the raw command kept."""
        method = str(body.get("method") if isinstance(body, dict) else "?")[:60]
        reason = f"control_{refusal.reason}"
        log.warning(
            "refused control command %s (%s): %s",
            method,
            reason,
            refusal.detail,
            extra={"event": "control_refused", "reason": reason, "role": self.role},
        )
        try:
            dead_letter(
                self.conn,
                self.role,
                reason=reason,
                detail=refusal.detail,
                task_id=f"control:{method}",
                headers=headers,
                delivery_info={},
                body=body,
            )
        except redis.RedisError as exc:
            log.warning("could not record the refused control command: %s", exc)


class GatedNode(Node):  # type: ignore[misc]
    """A worker's mailbox node that dispatches only commands its :class:`ControlGate` admits."""

    def handle_message(self, body: Any, message: Any = None) -> Any:
        if not isinstance(body, dict) or not self._addressed_to_me(body):
            return None  # for another node: not ours to judge
        headers = dict(message.headers or {}) if message is not None else {}
        gate = self.mailbox.gate_for(self.hostname)
        try:
            gate.check(body, headers, self.hostname)
        except MessageRejected as refusal:
            gate.refuse(body, headers, refusal)
            return None
        return super().handle_message(body, message)

    def _addressed_to_me(self, body: dict[str, Any]) -> bool:
        from kombu.matcher import match

        destination, pattern, matcher = body.get("destination"), body.get("pattern"), body.get("matcher")
        if destination:
            return bool(self.hostname in destination)
        if pattern and matcher:
            return bool(match(self.hostname, pattern, matcher))
        return True


#: Signers loaded for processes without an agent of their own, per (XNAI_HOME, agent).
_FALLBACK_SOURCES: dict[tuple[str, str], SignerSource] = {}


class SignedMailbox(Mailbox):  # type: ignore[misc]
    """kombu's mailbox, signing what it sends and keeping only signed replies."""

    node_cls = GatedNode
    #: The Celery app this mailbox belongs to (set by :class:`SignedControl`).
    celery_app: Any = None
    _gates: ClassVar[dict[str, ControlGate]] = {}

    # ---- who signs, who verifies

    def signer(self, *, reply: bool = False) -> Signer | None:
        """Who signs: a client's context first; then, for a reply, this worker's own agent; else the agent
        the app names (``xnai_control_agent``: a role worker's role, Flower's ``flower``, else the copilot)."""
        from xnai_tasks.security.publish import context_source, process_source

        source = context_source() or (process_source() if reply else None)
        if source is not None:
            return source.get()
        agent, home = self._conf("xnai_control_agent"), self._conf("xnai_home")
        if not agent or not home:
            return None
        try:
            return self._fallback_source(str(home), str(agent)).get()
        except XnaiError as exc:
            log.warning("control messages go unsigned: %s", exc)
            return None

    def keyring(self) -> Keyring:
        """The keyring under the app's XNAI_HOME."""
        return shared_keyring(Path(str(self._conf("xnai_home"))))

    def gate_for(self, hostname: str) -> ControlGate:
        from xnai_tasks.worker.role import current_role

        role = current_role() or hostname.split("@", 1)[0]  # a node may be named celery@HOST
        gate = self._gates.get(role)
        if gate is None:
            conn = broker.connect(str(self.celery_app.conf.broker_url), timeout=5.0)
            gate = self._gates[role] = ControlGate(self.keyring(), conn, role)
        return gate

    def _conf(self, name: str) -> Any:
        return None if self.celery_app is None else self.celery_app.conf.get(name)

    def _fallback_source(self, home: str, agent: str) -> SignerSource:
        key = (home, agent)
        if key not in _FALLBACK_SOURCES:
            _FALLBACK_SOURCES[key] = SignerSource(Path(home), agent)
        return _FALLBACK_SOURCES[key]

    # ---- sending commands

    def _publish(
        self,
        type: str,
        arguments: Any,
        destination: Any = None,
        reply_ticket: str | None = None,
        channel: Any = None,
        timeout: float | None = None,
        serializer: str | None = None,
        producer: Any = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "method": type,
            "arguments": arguments,
            "destination": destination,
            "pattern": pattern,
            "matcher": matcher,
        }
        chan = channel or self.connection.default_channel
        if reply_ticket:
            maybe_declare(self.reply_queue(chan))
            body.update(ticket=reply_ticket, reply_to={"exchange": self.reply_exchange.name, "routing_key": self.oid})
        headers: dict[str, Any] = {"clock": self.clock.forward(), "expires": time.time() + timeout if timeout else 0}
        signer = self.signer()
        if signer is not None:
            headers[SIG_HEADER] = sign_control(signer, body=body)
        with self.producer_or_acquire(producer, chan) as publisher:
            publisher.publish(
                body,
                exchange=self.exchange.name,
                declare=[self.exchange],
                headers=headers,
                serializer=serializer or self.serializer,
                retry=True,
            )

    # ---- replying (in a worker)

    def _publish_reply(
        self,
        reply: Any,
        exchange: str,
        routing_key: str,
        ticket: str,
        channel: Any = None,
        producer: Any = None,
        **opts: Any,
    ) -> None:
        passwords = [p for p in (url_password(str(self._conf("broker_url") or "")),) if p]
        clean = scrub(reply, passwords)
        headers: dict[str, Any] = {"ticket": ticket, "clock": self.clock.forward()}
        signer = self.signer(reply=True)
        if signer is not None:
            headers[SIG_HEADER] = sign_reply(signer, ticket=ticket, body=clean)
        chan = channel or self.connection.default_channel
        target = Exchange(exchange, exchange_type="direct", delivery_mode="transient", durable=False)
        # InconsistencyError: the reply queue is gone, nobody waits for this reply any more
        with self.producer_or_acquire(producer, chan) as publisher, contextlib.suppress(InconsistencyError):
            publisher.publish(
                clean,
                exchange=target,
                routing_key=routing_key,
                declare=[target],
                headers=headers,
                retry=True,
                **opts,
            )

    # ---- collecting replies (in the sender)

    def _collect(
        self,
        ticket: str,
        limit: int | None = None,
        timeout: float = 1,
        callback: Callable[[Any], None] | None = None,
        channel: Any = None,
        accept: Any = None,
    ) -> list[Any]:
        accept = self.accept if accept is None else accept
        chan = channel or self.connection.default_channel
        queue = self.reply_queue
        consumer = Consumer(chan, [queue], accept=accept, no_ack=True)
        responses: list[Any] = []
        unclaimed = self.unclaimed
        keyring = self.keyring() if self._conf("xnai_home") else None
        try:
            return list(unclaimed.pop(ticket))
        except KeyError:
            pass

        def on_message(body: Any, message: Any) -> None:
            header = message.headers.get
            self.clock.adjust(header("clock") or 0)
            expires = header("expires")
            if expires and time.time() > expires:
                return
            this_id = header("ticket", ticket)
            if keyring is None or not authentic_reply(keyring, this_id, body, header(SIG_HEADER)):
                log.debug("dropped a control reply that is not signed by the node's role")
                return
            if this_id == ticket:
                if callback:
                    callback(body)
                responses.append(body)
            else:
                unclaimed[this_id].append(body)

        consumer.register_callback(on_message)
        try:
            with consumer:
                for _ in range(limit) if limit else count():
                    try:
                        self.connection.drain_events(timeout=timeout)
                    except TimeoutError:  # socket.timeout is TimeoutError
                        break
                return responses
        finally:
            chan.after_reply_message_received(queue.name)


def authentic_reply(keyring: Keyring, ticket: Any, body: Any, signature: Any) -> bool:
    """True when a reply is signed by a key in the keyring, and a node it names after an agent
    (``ROLE@host``) is that agent's: no role can answer for another. A node named otherwise (Celery's
    default ``celery@HOST``) counts for no role in ``xnai status``."""
    try:
        verified = verify_reply(keyring, ticket=ticket, body=body, signature=signature, now=time.time())
    except MessageRejected:
        return False
    if not isinstance(body, dict) or not body:
        return False
    return all(_may_answer_for(verified.agent, node) for node in body)


def _may_answer_for(agent: str, node: Any) -> bool:
    """An agent answers for its own nodes (``AGENT@host``) and for nodes named after no agent."""
    if not isinstance(node, str):
        return False
    prefix = node.split("@", 1)[0]
    return prefix == agent or prefix not in c.AGENTS


class SignedControl(Control):  # type: ignore[misc]
    """Celery's ``app.control`` on a :class:`SignedMailbox`."""

    Mailbox = SignedMailbox

    def __init__(self, app: Any = None) -> None:
        super().__init__(app)
        self.mailbox.celery_app = app
