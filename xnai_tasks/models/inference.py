"""The inference helpers the role tasks use: generate text, embed sentences, chunk a text, compare vectors."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any, TypedDict, cast

from xnai_tasks.errors import ModelError, PromptTooLongError, UsageError
from xnai_tasks.models.loading import LLM, Encoder
from xnai_tasks.models.prompt_cache import prepare as prepare_prompt
from xnai_tasks.observability.metrics import count_tokens


class Generation(TypedDict):
    """What :func:`generate` returns."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str


def generate(
    llm: LLM,
    prompt: str,
    max_tokens: int,
    temperature: float = 0.7,
    *,
    system: str | None = None,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    raw: bool = False,
    preamble: str | None = None,
) -> Generation:
    """Generate with the model's prompt format (chat template or completion template).

    ``raw=True`` continues ``prompt`` as it is, with no template (e.g. code after a comment header).
    ``system`` (notes, facts) comes before the prompt, outside the completion template: a base model
    reads it as a preamble to the question, not as part of it (Gemma has no system role). ``preamble`` (a role's
    fixed instructions) comes first of all, so prompts of one template share their first tokens and a prompt
    cache (:mod:`xnai_tasks.models.prompt_cache`) can skip evaluating them again. ``max_tokens`` is
    lowered to what the context has room for; a prompt that does not fit at all raises :class:`PromptTooLongError`.
    """
    stop_words = list(llm.stop if stop is None else stop)
    top_p = float(llm.defaults.get("top_p", 0.95))
    repeat_penalty = float(llm.defaults.get("repeat_penalty", 1.1))
    completion = raw or llm.prompt_format == "completion"
    text = compose_prompt(llm, prompt, system=system, preamble=preamble, raw=raw)
    used = len(llm.llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)) + 16
    room = llm.n_ctx - used
    if room < 1:
        raise PromptTooLongError(f"prompt of ~{used} tokens does not fit the model's context of {llm.n_ctx}")
    max_tokens = max(1, min(max_tokens, room))
    start = time.monotonic()
    try:
        options: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "repeat_penalty": repeat_penalty,
            "stop": stop_words,
            "seed": seed,
        }
        if completion:
            prepare_prompt(llm, text, preamble)
            out: Any = llm.llama.create_completion(prompt=text, **options)
            choice_text = out["choices"][0]["text"]
        else:
            out = llm.llama.create_chat_completion(messages=[{"role": "user", "content": text}], **options)
            choice_text = out["choices"][0]["message"]["content"] or ""
    except ValueError as exc:
        raise ModelError(f"generation failed: {exc}") from None
    usage = out["usage"]
    count_tokens(llm.path.stem, int(usage["prompt_tokens"]) + int(usage["completion_tokens"]))
    return Generation(
        text=str(choice_text).strip(),
        prompt_tokens=int(usage["prompt_tokens"]),
        completion_tokens=int(usage["completion_tokens"]),
        seconds=round(time.monotonic() - start, 3),
        finish_reason=str(out["choices"][0].get("finish_reason") or "stop"),
    )


def compose_prompt(
    llm: LLM, prompt: str, *, system: str | None = None, preamble: str | None = None, raw: bool = False
) -> str:
    """The text :func:`generate` gives the model: ``preamble``, ``system``, then the prompt in its template."""
    completion = raw or llm.prompt_format == "completion"
    text = llm.completion_template.replace("{prompt}", prompt) if completion and not raw else prompt
    parts = [part for part in (preamble, system) if part is not None]
    return "\n\n".join([*parts, text])


def embed(encoder: Encoder, texts: Sequence[str], batch_size: int = 32) -> list[list[float]]:
    """Sentence embeddings: mean of the token vectors (padding masked out), L2-normalised."""
    import torch

    if batch_size < 1:
        raise UsageError("batch_size must be at least 1")
    vectors: list[list[float]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = encoder.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=encoder.max_length,
                return_tensors="pt",
            )
            hidden = encoder.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors.extend(cast(list[list[float]], pooled.tolist()))
    return vectors


_WORD = re.compile(r"\S+")


def chunk_text(text: str, size: int = 200, overlap: int = 40) -> list[str]:
    """Split into chunks of at most ``size`` words, consecutive chunks sharing ``overlap`` words.

    Words (whitespace-separated) stand in for tokens (an encoder token is ~0.75 word); each chunk is
    the original text between its first and last word, whitespace and line breaks kept.
    """
    if size < 1 or not 0 <= overlap < size:
        raise UsageError(f"chunk size {size} must be >= 1 and overlap {overlap} between 0 and size - 1")
    spans = [m.span() for m in _WORD.finditer(text)]
    chunks: list[str] = []
    start = 0
    while start < len(spans):
        end = min(start + size, len(spans))
        chunks.append(text[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):
            break
        start = end - overlap
    return chunks


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0.0 when either vector is zero."""
    if len(a) != len(b):
        raise UsageError(f"vectors of different lengths ({len(a)} and {len(b)})")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
