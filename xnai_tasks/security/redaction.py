"""Keeping secrets out of what leaves a process: replies, pages, logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"
#: Keys whose values are never shown, whatever they hold.
SECRET_KEYS = frozenset({"password", "passwd", "secret"})


def url_password(url: str) -> str | None:
    """The password a Redis URL carries, if any (decoded)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return None
    try:
        password = urlsplit(f"redis://{rest}").password
    except ValueError:
        return None
    return unquote(password) if password else None


def scrub(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` with every occurrence of each secret (and its URL-quoted form) masked, and secret keys blanked."""
    from urllib.parse import quote

    needles = sorted(
        {s for secret in secrets if secret for s in (secret, quote(secret, safe=""))}, key=len, reverse=True
    )

    def clean(item: Any) -> Any:
        if isinstance(item, str):
            for needle in needles:
                item = item.replace(needle, MASK)
            return item
        if isinstance(item, dict):
            return {k: (MASK if str(k).lower() in SECRET_KEYS and v else clean(v)) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [clean(v) for v in item]
        return item

    return clean(value)
