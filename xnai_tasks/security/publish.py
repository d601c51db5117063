"""The publish hook: every task message this process sends is signed by its agent.

One agent identity per process: the copilot's key in a client, the role's key in a role worker (set
in the parent before the pool forks, so retries and subtasks sent from tasks are signed by the worker
that sent them); a client's submit may sign as another agent for its own context (:func:`signing_as`).
The verification side lives in :mod:`xnai_tasks.security.gate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final

from xnai_tasks.core import constants as c
from xnai_tasks.security.keyring import SignerSource
from xnai_tasks.security.message_signature import sign_message
from xnai_tasks.security.signature import SIG_HEADER


class _Signers:
    """Who this process signs as: its default agent, and a signer the current context may set over it."""

    def __init__(self) -> None:
        #: Set once, in a worker's parent (pool children inherit it) or by a client.
        self.process: SignerSource | None = None
        #: A client's submit signs as its own agent for its context only.
        self.context: ContextVar[SignerSource | None] = ContextVar("xnai_signer", default=None)


_signers = _Signers()


def load_agent(home: Path, agent: str) -> SignerSource:
    """The signing key source of ``agent`` under ``home``; the key is loaded now, so a bad one fails early."""
    source = SignerSource(home, agent)
    source.get()
    return source


def use_agent(home: Path, agent: str, *, default_only: bool = False) -> SignerSource:
    """Sign what this process sends (messages and results) as ``agent`` unless a context says otherwise.

    With ``default_only`` an existing process default is kept (a client does not take over a worker's key).
    """
    if default_only and _signers.process is not None:
        return _signers.process
    source = load_agent(home, agent)
    _signers.process = source
    return source


@contextmanager
def signing_as(source: SignerSource) -> Iterator[None]:
    """Within the block, messages published by this thread are signed by ``source``."""
    token = _signers.context.set(source)
    try:
        yield
    finally:
        _signers.context.reset(token)


def current_source() -> SignerSource | None:
    """The signer of this thread's context (a client's submit), else the process's agent, else None."""
    return context_source() or process_source()


def context_source() -> SignerSource | None:
    """The signer set by :func:`signing_as` for this thread's context, if any."""
    return _signers.context.get()


def process_source() -> SignerSource | None:
    """The agent this process signs as by default (a role worker's role), if any."""
    return _signers.process


#: The queues a signature can be good for: a worker verifies a message only on its role's own queue.
SIGNED_QUEUES: Final = frozenset(c.queue_for(role) for role in c.ROLES)


def sign_outgoing(
    body: Any = None, headers: dict[str, Any] | None = None, routing_key: str | None = None, **_: Any
) -> None:
    """Add the signature header to every task message this process publishes to a role queue (retries re-sign).

    A message to any other queue (another Celery app's, in the same process) is left alone: none of our
    workers could accept it, so a signature would only be work and a key's signature handed out.
    """
    if routing_key not in SIGNED_QUEUES or headers is None:
        return
    source = current_source()
    if source is None:
        return  # unsigned: every worker refuses it
    headers[SIG_HEADER] = sign_message(source.get(), headers=headers, body=body, queue=routing_key)
