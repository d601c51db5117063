"""The worker's side of the response cache: store an answer after a successful run; with ``cache="semantic"``,
look for a close earlier request before generating.

Storing is best effort: the answer is already stored for its caller (``on_success`` runs after the result),
and a failure to cache it is logged, never the task's failure. Only a role with an encoder can compare
requests in words (grok); a semantic request to a role without one (cline) gets the exact lookup the client
already made, and its answer is stored without a vector.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import redis

from xnai_tasks.cache import store
from xnai_tasks.cache.entry import cache_key, hit_result, sign_entry, verify_entry
from xnai_tasks.cache.guard import MIN_COSINE, Embedded, lookup
from xnai_tasks.cache.policy import CACHE_HEADER, cacheable
from xnai_tasks.cache.request import PROMPT_KWARGS, Request, request_text
from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected, XnaiError
from xnai_tasks.security.canonical import digest
from xnai_tasks.security.keyring import Keyring, shared_keyring
from xnai_tasks.settings import Settings, process_settings

log = logging.getLogger(__name__)

#: Most recent earlier requests of the same scope a semantic lookup compares with.
SEMANTIC_CANDIDATES: Final = 32
#: Where a semantic lookup leaves the request's text and vector for the store after the run.
_VECTOR_ATTR: Final = "xnai_cache_vector"


def requested_mode(request: Any) -> str:
    """The cache mode the client settled on (message header); ``off`` when none was sent."""
    mode = getattr(request, CACHE_HEADER, None)
    return mode if mode in ("exact", "semantic") else "off"


def role_models(role: str) -> list[str]:
    """This worker's models of ``role`` as ``kind:sha256`` (empty when one has no checksum)."""
    from xnai_tasks.worker import startup as runtime

    holders = runtime.registry(role).holders()
    if any(not h.model.sha256 for h in holders):
        return []
    return sorted(f"{h.model.kind}:{h.model.sha256}" for h in holders)


def store_answer(task: Any, role: str, short: str, task_id: str, kwargs: Mapping[str, Any], result: Any) -> None:
    """After a successful run: sign and store ``result`` under the request's key (if the request asked for it)."""
    if requested_mode(task.request) == "off" or not cacheable(role, short) or not _storable(result):
        return
    settings = process_settings()
    if not settings.cache:
        return
    try:
        vector = getattr(task.request, _VECTOR_ATTR, None)
        _store(task.backend.client, settings, role, short, task_id, kwargs, result, vector)
    except (redis.RedisError, XnaiError, OSError, ValueError, TypeError) as exc:
        log.warning("%s.%s %s: answer not cached: %s", role, short, task_id, exc)


def _storable(result: Any) -> bool:
    """A dict that is neither a cache hit nor a degraded answer (grok without its LLM) is worth caching."""
    return isinstance(result, dict) and "cache" not in result and not result.get("degraded")


def _store(
    conn: redis.Redis,
    settings: Settings,
    role: str,
    short: str,
    task_id: str,
    kwargs: Mapping[str, Any],
    result: dict[str, Any],
    embedded: Embedded | None,
) -> None:
    from xnai_tasks.security.publish import process_source

    models = role_models(role)
    source = process_source()
    if not models or source is None:
        return  # no checksummed model to tie the answer to, or no key to sign it with
    key = cache_key(role, short, kwargs, models)
    body: dict[str, Any] = {
        "key": key,
        "role": role,
        "task": short,
        "models": models,
        "result": result,
        "source_task": task_id,
        "created": time.time(),
    }
    if embedded is not None:
        body |= {"text": embedded.request.text, "scope": embedded.request.scope, "vector": list(embedded.vector)}
    entry = sign_entry(source.get(), body)
    evicted = store.insert(conn, role, key, entry, ttl_s=settings.cache_ttl, cap_bytes=settings.cache_max_mb << 20)
    if evicted >= 0 and embedded is not None:
        _index(conn, key, c.cache_semantic_key(role, _scope_id(embedded.request, models)), settings.cache_ttl)


def _index(conn: redis.Redis, key: str, index: str, ttl_s: int) -> None:
    """Make ``key`` a semantic candidate of its scope; the index forgets members older than the TTL (their
    entries expired) and goes with its last one. Its members are not in the byte count (64 bytes each)."""
    now = time.time()
    pipe = conn.pipeline(transaction=True)
    pipe.zadd(index, {key: now})
    pipe.zremrangebyscore(index, "-inf", now - ttl_s)
    pipe.expire(index, ttl_s)
    pipe.execute()


def _scope_id(request: Request, models: list[str]) -> str:
    return digest({"scope": request.scope, "models": models})


def semantic_answer(task: Any, role: str, short: str, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """With ``cache="semantic"`` on a role with an encoder: the answer to a close earlier request the guard
    accepts, or None (then the text and vector are kept for the store after the run)."""
    if requested_mode(task.request) != "semantic" or (role, short) not in PROMPT_KWARGS:
        return None
    settings = process_settings()
    if not settings.cache:
        return None
    models = role_models(role)
    if not models or not any(m.startswith("encoder:") for m in models):
        return None  # no encoder in this role (cline): only the client's exact lookup applies
    try:
        new = embed_request(role, request_text(role, short, kwargs))
        setattr(task.request, _VECTOR_ATTR, new)
        return find_semantic(task.backend.client, shared_keyring(settings.home), role, new, models, counts_as=role)
    except (redis.RedisError, XnaiError, OSError, ValueError) as exc:
        log.warning("%s.%s: semantic lookup skipped: %s", role, short, exc)
        return None


def embed_request(role: str, request: Request) -> Embedded:
    """The request and its vector by this worker's encoder."""
    from xnai_tasks.cache.encoder import embed_texts
    from xnai_tasks.worker import startup as runtime

    vector = embed_texts(runtime.registry(role).encoder, [request.text])[0]
    return Embedded(request=request, vector=vector)


def find_semantic(
    conn: redis.Redis, keyring: Keyring, role: str, new: Embedded, models: list[str], *, counts_as: str | None
) -> dict[str, Any] | None:
    """The answer of the earlier request (same scope and models) the guard lets serve ``new``, or None.

    Entries that do not verify are skipped (and counted as ``bad_entry``); a best candidate at least
    :data:`MIN_COSINE` close that the guard turns down is counted as ``refused``. ``counts_as`` None counts
    nothing (``xnai cache match``).
    """
    index = c.cache_semantic_key(role, _scope_id(new.request, models))
    newest = conn.zrange(index, -SEMANTIC_CANDIDATES, -1)
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in newest]
    raws = conn.mget([c.cache_entry_key(role, k) for k in keys]) if keys else []
    bodies: list[dict[str, Any]] = []
    bad = 0
    for key, raw in zip(keys, raws, strict=True):
        if raw is None:
            continue  # expired or evicted; its index member goes when it ages out
        try:
            bodies.append(verify_entry(keyring, raw, key=key, role=role, models=models))
        except MessageRejected:
            bad += 1
    pairs = [(body, found) for body in bodies if (found := _embedded(body)) is not None]
    index_hit, decision = lookup(new, [found for _, found in pairs])
    if counts_as is not None:
        # refused: a candidate close enough to compare, turned down by the guard's wording rules
        refused = decision is not None and decision.score >= MIN_COSINE
        _count(conn, counts_as, role, bad=bad, hit=index_hit is not None, refused=refused)
    if index_hit is None or decision is None:
        return None
    return hit_result(pairs[index_hit][0], "semantic", decision.score)


def _embedded(body: Mapping[str, Any]) -> Embedded | None:
    text, scope, vector = body.get("text"), body.get("scope"), body.get("vector")
    if not isinstance(text, str) or not isinstance(scope, str) or not isinstance(vector, list):
        return None
    request = Request(role=str(body["role"]), task=str(body["task"]), text=text, scope=scope)
    return Embedded(request=request, vector=[float(v) for v in vector])


def _count(conn: redis.Redis, agent: str, role: str, *, bad: int, hit: bool, refused: bool) -> None:
    pipe = conn.pipeline(transaction=False)
    if bad:
        pipe.hincrby(c.cache_counts_key(agent), f"{role}:bad_entry", bad)
    if hit:
        pipe.hincrby(c.cache_counts_key(agent), f"{role}:semantic_hit", 1)
    elif refused:
        pipe.hincrby(c.cache_counts_key(agent), f"{role}:refused", 1)
    pipe.execute()
