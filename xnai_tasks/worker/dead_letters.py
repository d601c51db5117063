"""The dead-letter list: every message a role refused or gave up on, kept raw, bounded, and counted.

The gate writes here when it refuses a message; the delivery ledger when a message killed its worker
``XNAI_MAX_DELIVERIES`` times. ``xnai status`` shows the counts and ``xnai status --dead-letters ROLE``
the entries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from xnai_tasks.core import constants as c

#: Raw bodies longer than this are cut in the dead-letter entry.
DEAD_LETTER_BODY_MAX = 64 * 1024


def dead_letter(
    conn: redis.Redis,
    role: str,
    *,
    reason: str,
    detail: str,
    task_id: str,
    headers: Mapping[str, Any],
    delivery_info: Mapping[str, Any],
    body: Any,
) -> None:
    """Count one refusal of ``role`` under ``reason`` and keep the raw message (newest first, trimmed)."""
    entry = json.dumps(
        {
            "ts": time.time(),
            "reason": reason,
            "detail": detail,
            "id": task_id,
            "headers": _jsonable(headers),
            "delivery_info": _jsonable(delivery_info),
            "body": raw_body(body),
        }
    )
    pipe = conn.pipeline(transaction=False)
    pipe.hincrby(c.refused_counter_key(role), reason, 1)
    pipe.lpush(c.dead_letter_key(role), entry)
    pipe.ltrim(c.dead_letter_key(role), 0, c.DEAD_LETTER_MAX - 1)
    pipe.execute()


def raw_body(body: Any) -> str:
    """A message body as text, cut at :data:`DEAD_LETTER_BODY_MAX`."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes | bytearray) else str(body)
    return text[:DEAD_LETTER_BODY_MAX]


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return repr(value)[:1000]
