"""How a run's steps go out, as the copilot: one step as a single signed task, parallel steps as one signed Celery
``group``. Blocking (kombu publishes so): the sync run calls these directly, the async run in a worker thread.

Each task carries the run's lineage (``root_id``, ``parent_id``: :meth:`Ledger.lineage`), which Celery's task
events hand to Flower. Steps are never answered from the response cache: a step's result must carry its
worker's signature (provenance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import group
from kombu.exceptions import OperationalError
from redis import RedisError

from xnai_tasks.errors import BrokerUnreachableError, XnaiError
from xnai_tasks.workflow.spec import Step

if TYPE_CHECKING:
    from celery import Signature

    from xnai_tasks.client.sync import Client, TaskHandle

log = logging.getLogger(__name__)

#: A task's ``root_id`` and ``parent_id``.
Lineage = Mapping[str, str | None]


@dataclass(frozen=True)
class Member:
    """A step ready to go out (alone or in a group): its signature and the handle its result arrives on."""

    step: Step
    signature: Signature
    handle: TaskHandle


def prepare(client: Client, steps: tuple[Step, ...]) -> tuple[list[Member], list[tuple[Step, XnaiError]]]:
    """The members of a group, each checked as a submit is; the steps refused (bad arguments) apart."""
    members: list[Member] = []
    refused: list[tuple[Step, XnaiError]] = []
    for step in steps:
        try:
            members.append(ready(client, step))
        except XnaiError as exc:
            refused.append((step, exc))
    return members, refused


def ready(client: Client, step: Step) -> Member:
    """``step`` ready to go out, checked as a submit is (UsageError: bad arguments); nothing is sent yet."""
    signature, handle = client.signature(
        step.role, step.task, expires_s=step.timeout_s, cache="off", **dict(step.kwargs)
    )
    return Member(step, signature, handle)


def send_one(client: Client, member: Member, lineage: Lineage) -> list[TaskHandle]:
    """Send one step as a single task; OverloadedError or BrokerUnreachableError if it did not go out."""
    _publish(client, lambda: member.signature.apply_async(**lineage), f"{member.step.role}.{member.step.task}")
    return [member.handle]


def send_group(client: Client, members: list[Member], group_id: str, lineage: Lineage) -> list[TaskHandle]:
    """Publish ``members`` as one group ``group_id``; if it was not wholly sent, every member is revoked and the
    error raised (the members before a full queue went out)."""
    handles = [member.handle for member in members]
    try:
        _publish(
            client,
            lambda: group([m.signature for m in members], app=client.app).apply_async(task_id=group_id, **lineage),
            f"group {group_id}",
        )
    except XnaiError:
        revoke(client, [handle.id for handle in handles])
        raise
    return handles


def _publish(client: Client, send: Callable[[], object], what: str) -> None:
    try:
        with client.signing():
            send()
    except (OperationalError, RedisError, OSError) as exc:
        raise BrokerUnreachableError(f"could not enqueue {what}: {exc}") from None


def revoke(client: Client, ids: list[str], *, terminate: bool = False) -> None:
    """Revoke tasks with a signed control command (``terminate``: kill them if they already run); never raises."""
    if not ids:
        return
    try:
        with client.signing():
            client.app.control.revoke(ids, terminate=terminate)
    except Exception as exc:  # the run is failing already: say it, never mask the step's error
        log.warning("could not revoke %d step task(s) %s: %s", len(ids), ", ".join(ids[:3]), exc)
