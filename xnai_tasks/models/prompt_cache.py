"""Prompt reuse: a process's llama.cpp states after each role template's fixed instructions, bounded in RAM.

Every role prompt starts with its template's fixed instructions (:mod:`xnai_tasks.worker.prompts`). Before a
completion, :func:`prepare` puts exactly those instructions' tokens in the model's context: kept if the
context holds them already (the last prompt had the same template), restored from this process's
:class:`PromptCache` if it has them, else evaluated on their own and stored. llama-cpp-python then evaluates
only the rest of the prompt.

Why not ``Llama.set_cache`` with its ``LlamaRAMCache``: each state it keeps carries a copy of the logits buffer
(``n_batch`` rows of the vocabulary, ~200 MB for Gemma's 262k tokens) that its capacity does not count, and
its restore scans that whole 512 MiB buffer (0.8-1.0 s to the first token after a restore here, 0.2 s
without). And why always the instructions alone, with or without a cache: llama.cpp's CPU kernels round
differently for different batch shapes, so the same prompt evaluated in one batch or in two would not give
the same answer for a given seed; here it is always two (the instructions, then the rest), so a cached and an
uncached call compute the same numbers.

The cache is made in the process that generates (a pool child, after the fork: :func:`attach`); one found in
another process's memory (inherited by a fork) is replaced, never used.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from xnai_tasks.errors import ModelError
from xnai_tasks.models.loading import LLM

MiB = 1024 * 1024
#: What :func:`prepare` did: context already held the instructions, restored them, evaluated them, or nothing.
Preparation = Literal["held", "restored", "evaluated", "none"]


class PromptCache:
    """llama.cpp states by the instruction tokens they hold; the least recently used go while over the bound."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        #: The process that made it: a cache found in another process (inherited by a fork) is not used.
        self.pid = os.getpid()
        self.counts: dict[str, int] = {"held": 0, "restored": 0, "evaluated": 0}
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """Bytes the stored states hold."""
        return self._bytes

    def get(self, tokens: tuple[int, ...]) -> bytes | None:
        """The state after exactly ``tokens``, if stored (it becomes the most recently used)."""
        state = self._states.get(tokens)
        if state is not None:
            self._states.move_to_end(tokens)
        return state

    def put(self, tokens: tuple[int, ...], state: bytes) -> None:
        """Store ``state`` for ``tokens``, dropping the least recently used while over the bound (even itself)."""
        old = self._states.pop(tokens, None)
        self._bytes -= 0 if old is None else len(old)
        self._states[tokens] = state
        self._bytes += len(state)
        while self._bytes > self.capacity_bytes and self._states:
            _, dropped = self._states.popitem(last=False)
            self._bytes -= len(dropped)

    def report(self) -> dict[str, int]:
        """Entries, bytes held, the bound, what :func:`prepare` did so far, and the process it belongs to."""
        return {
            "entries": len(self._states),
            "bytes": self._bytes,
            "capacity_bytes": self.capacity_bytes,
            **self.counts,
            "pid": self.pid,
        }


#: The prompt cache per loaded model (its ``Llama``); an unloaded model's goes with it.
_caches: weakref.WeakKeyDictionary[Any, PromptCache] = weakref.WeakKeyDictionary()


def attach(llm: LLM, capacity_bytes: int) -> PromptCache | None:
    """This process's prompt cache for ``llm`` (made here on first use); none when ``capacity_bytes`` is 0."""
    found = _caches.get(llm.llama)
    if capacity_bytes <= 0:
        _caches.pop(llm.llama, None)
        return None
    if found is None or found.pid != os.getpid() or found.capacity_bytes != capacity_bytes:
        found = _caches[llm.llama] = PromptCache(capacity_bytes)
    return found


def use_cache(llm: LLM, cache: PromptCache | None) -> None:
    """Make ``cache`` (or none) the prompt cache of ``llm`` in this process (a bench switches it on and off)."""
    if cache is None:
        _caches.pop(llm.llama, None)
    else:
        _caches[llm.llama] = cache


def current(llm: LLM) -> PromptCache | None:
    """The prompt cache of ``llm`` made in this process, if any."""
    cache = _caches.get(llm.llama)
    return cache if cache is not None and cache.pid == os.getpid() else None


def report(llm: LLM) -> dict[str, int] | None:
    """What :meth:`PromptCache.report` says for ``llm`` in this process (None: off, or not made here)."""
    cache = current(llm)
    return None if cache is None else cache.report()


def prepare(llm: LLM, text: str, preamble: str | None) -> Preparation:
    """Leave exactly ``preamble``'s tokens in the context, so the completion of ``text`` evaluates only the rest."""
    fixed = _fixed_tokens(llm, text, preamble)
    if fixed is None:
        return "none"
    cache = current(llm)
    done = _place(llm, fixed, cache)
    if cache is not None:
        cache.counts[done] += 1
    return done


def _fixed_tokens(llm: LLM, text: str, preamble: str | None) -> tuple[int, ...] | None:
    """The tokens ``text`` starts with that are ``preamble``'s (BOS first); None when there is nothing to reuse."""
    if not preamble or not text.startswith(preamble):
        return None
    tokens = llm.llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    alone = llm.llama.tokenize(preamble.encode("utf-8"), add_bos=True, special=True)
    fixed = tuple(tokens[: _shared(tokens, alone)])
    return fixed if 2 <= len(fixed) < len(tokens) else None


def _place(llm: LLM, fixed: tuple[int, ...], cache: PromptCache | None) -> Preparation:
    llama = llm.llama
    if _shared(llama.input_ids[: llama.n_tokens].tolist(), fixed) == len(fixed) and _truncate(llm, len(fixed)):
        return "held"
    if cache is not None and (state := cache.get(fixed)) is not None:
        _restore(llm, state, fixed)
        return "restored"
    llama.reset()  # type: ignore[no-untyped-call]
    llama.eval(list(fixed))
    if cache is not None:
        cache.put(fixed, _snapshot(llm))
    return "evaluated"


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# llama-cpp-python keeps the context's tokens in ``input_ids[:n_tokens]`` and decodes before sampling when
# ``_requires_eval`` is set; the three helpers below keep those in step with the KV cache they change.


def _truncate(llm: LLM, n: int) -> bool:
    """Keep the first ``n`` tokens of the context; False when llama.cpp cannot drop the rest (then nothing changed)."""
    llama = llm.llama
    if not llama._ctx.kv_cache_seq_rm(-1, n, -1):
        return False
    llama.n_tokens = n
    llama._requires_eval = True
    return True


def _snapshot(llm: LLM) -> bytes:
    import llama_cpp

    ctx = llm.llama._ctx.ctx
    size = int(llama_cpp.llama_state_get_size(ctx))
    buffer = (ctypes.c_uint8 * size)()
    written = int(llama_cpp.llama_state_get_data(ctx, buffer, size))
    return ctypes.string_at(buffer, written)


def _restore(llm: LLM, state: bytes, tokens: tuple[int, ...]) -> None:
    import llama_cpp

    llama = llm.llama
    buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    if int(llama_cpp.llama_state_set_data(llama._ctx.ctx, buffer, len(state))) != len(state):
        raise ModelError("llama.cpp refused a stored prompt state")
    llama.input_ids[: len(tokens)] = tokens
    llama.n_tokens = len(tokens)
    llama._requires_eval = True
