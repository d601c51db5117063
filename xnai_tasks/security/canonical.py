"""Canonical JSON: the bytes a signature covers, the same for the producer's objects and the worker's.

Bodies and results are digested in a canonical JSON form of what they become after a JSON round trip
(tuples become lists, keys become strings; kombu's tagged types such as datetime are tagged the same
way kombu tags them), so the producer's Python objects and the worker's decoded ones digest alike.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any, Final


def _tagged(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "__value__": value}


def _json_default(obj: Any) -> Any:
    """Encode the types kombu's JSON serializer tags, in kombu's tagged form."""
    if isinstance(obj, dt.datetime):
        return _tagged("datetime", obj.isoformat())
    if isinstance(obj, dt.date):
        return _tagged("date", obj.isoformat())
    if isinstance(obj, dt.time):
        return _tagged("time", obj.isoformat())
    if isinstance(obj, decimal.Decimal):
        return _tagged("decimal", str(obj))
    if isinstance(obj, uuid.UUID):
        return _tagged("uuid", {"hex": obj.hex})
    if isinstance(obj, bytes):
        try:
            return _tagged("bytes", obj.decode("utf-8"))
        except UnicodeDecodeError:
            return _tagged("base64", base64.b64encode(obj).decode("ascii"))
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_ROUND_TRIP: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default)
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
#: One sorted pass with the kombu tags: equals canonical_json() when every dict key is a string.
_SORTED: Final = json.JSONEncoder(
    sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=_json_default
)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes of ``value`` as it is after a JSON round trip. Raises ValueError/TypeError."""
    return _CANONICAL.encode(json.loads(_ROUND_TRIP.encode(value))).encode("ascii")


def digest(value: Any) -> str:
    """SHA-256 hex of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def sorted_json(value: Any) -> bytes:
    """One sorted encoding of ``value``: equal to :func:`canonical_json` whenever every dict key is a string
    (as in any decoded message), and cheaper. TypeError when dict keys of mixed types cannot be sorted."""
    return _SORTED.encode(value).encode("ascii")


def canonical_document(doc: Mapping[str, Any]) -> bytes:
    """Deterministic JSON bytes of a document already made of plain JSON values (what a signature covers)."""
    return _CANONICAL.encode(doc).encode("ascii")
