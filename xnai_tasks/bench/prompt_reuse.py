"""``xnai bench prompt-reuse``: time to first token of the roles' prompts, prompt cache on vs off, in one run.

One process loads the default LLM (with the load options its probe settles on) and streams completions of
the four LLM templates in turn (cline's docs and code, grok's synthesis and analysis), each prompt starting
with its template's fixed instructions (:mod:`xnai_tasks.worker.prompts`) and ending with a different
request every round. Each prompt runs on three sides in turn (in alternating order), each starting from a
context that holds nothing to keep, as after another template's prompt; time to first token is the wait for
the first streamed chunk. The sides: ``none`` (the cache off:
the instructions are evaluated on their own, then the rest, as :func:`~xnai_tasks.models.inference.generate`
does), ``reuse`` (this process's :class:`~xnai_tasks.models.prompt_cache.PromptCache` restores them) and
``plain`` (llama-cpp-python alone, the prompt in one batch: what the split costs). ``none`` and ``reuse`` generate
the same prompts with the same seed, and the report says whether their texts were the same.
"""

from __future__ import annotations

import time
from typing import Any

from xnai_tasks.bench.harness import host_facts, median
from xnai_tasks.bench.options import BenchOptions, or_default
from xnai_tasks.models.inference import compose_prompt
from xnai_tasks.models.loading import LLM
from xnai_tasks.models.prompt_cache import MiB, PromptCache, prepare, use_cache
from xnai_tasks.settings import Settings
from xnai_tasks.worker import prompts

SEED = 7
TEMPERATURE = 0.7
#: The prompt cache the bench measures when XNAI_PROMPT_CACHE_MB is 0 (off).
DEFAULT_CAPACITY_MB = 64
#: none: the instructions evaluated on their own every time the context lacks them (what generate does with
#: the cache off); reuse: with this process's cache; plain: llama-cpp-python alone (one batch, no split).
SIDES = ("none", "reuse", "plain")
_SUBJECTS = (
    ("retries", "A task that fails with a transient error is retried with backoff and jitter."),
    ("signing", "Every message is signed with the sender's Ed25519 key and checked by the worker."),
    ("queues", "Each role has its own queue; a full queue refuses a submit with a retry-after."),
    ("telemetry", "Each finished task appends one JSON line to a file of its process and hour."),
    ("preloading", "Models load in the worker before the fork, so pool children share them."),
    ("the breaker", "After five LLM failures in a minute the role's breaker opens for thirty seconds."),
)


def _requests(llm: LLM, index: int) -> dict[str, str]:
    """Each template's prompt for request number ``index``, composed as the roles compose theirs."""
    topic, note = _SUBJECTS[index % len(_SUBJECTS)]
    case = f"{topic} (case {index})"
    analysis = f"How should {case} work? Using only the facts, give one advantage and one disadvantage of {topic}."
    return {
        "docs": compose_prompt(
            llm,
            f"Using the notes, explain {case} in one short paragraph.",
            system=f"Notes: {note}",
            preamble=prompts.DOCS,
        ),
        "code": compose_prompt(
            llm, f"# A function that logs {case}, in python.\n```python\n", preamble=prompts.CODE, raw=True
        ),
        "synthesis": compose_prompt(
            llm, f"Why does xnai-tasks handle {case} this way?", system=f"Notes: {note}", preamble=prompts.SYNTHESIS
        ),
        "analysis": compose_prompt(llm, analysis, system=f"Facts: {note}", preamble=prompts.ANALYSIS),
    }


def first_token(llm: LLM, text: str, preamble: str | None, tokens: int) -> tuple[float, float, str]:
    """Seconds to the first streamed chunk, seconds to the end, and the text, for one completion as generate runs it."""
    start = time.perf_counter()
    prepare(llm, text, preamble)
    first: float | None = None
    parts: list[str] = []
    stream: Any = llm.llama.create_completion(
        prompt=text,
        max_tokens=tokens,
        temperature=TEMPERATURE,
        top_p=float(llm.defaults.get("top_p", 0.95)),
        repeat_penalty=float(llm.defaults.get("repeat_penalty", 1.1)),
        seed=SEED,
        stream=True,
    )
    for chunk in stream:
        if first is None:
            first = time.perf_counter() - start
        parts.append(str(chunk["choices"][0]["text"]))
    total = time.perf_counter() - start
    return (total if first is None else first), total, "".join(parts)


def _load(settings: Settings, threads: int) -> LLM:
    from xnai_tasks.errors import ModelError
    from xnai_tasks.models.loading import load_llm
    from xnai_tasks.models.model_file import resolve_model
    from xnai_tasks.models.probe import probe_llm

    gguf = resolve_model("gguf", settings)
    options = probe_llm(settings, gguf, threads).options
    if options is None:
        raise ModelError(f"the LLM cannot run on this host, nothing to measure: {gguf.name}")
    return load_llm(gguf.path, int(gguf.params.get("n_ctx", 2048)), threads, params=gguf.params, options=options)


def run_prompt_reuse(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """TTFT of the roles' templates in turn, without and with the prompt cache, alternating by round."""
    rounds, threads, tokens = or_default(args.rounds, 3), or_default(args.threads, 2), or_default(args.tokens, 8)
    capacity = (settings.prompt_cache_mb or DEFAULT_CAPACITY_MB) * MiB
    llm = _load(settings, threads)
    cache = PromptCache(capacity)
    ttft: dict[str, list[float]] = {side: [] for side in SIDES}
    total: dict[str, list[float]] = {side: [] for side in SIDES}
    texts: dict[tuple[str, int, str], str] = {}
    for index in range(rounds + 1):  # request 0 warms every side up and fills the cache; it is not counted
        for position, (name, text) in enumerate(_requests(llm, index).items()):
            for side in SIDES if (index + position) % 2 else reversed(SIDES):
                use_cache(llm, cache if side == "reuse" else None)
                llm.llama.reset()  # type: ignore[no-untyped-call]  # as after another template: nothing to keep
                preamble = None if side == "plain" else prompts.TEMPLATES[name]
                first, whole, said = first_token(llm, text, preamble, tokens)
                texts[(side, index, name)] = said
                if index:
                    ttft[side].append(first)
                    total[side].append(whole)
    use_cache(llm, None)
    same = sum(texts[("none", i, n)] == texts[("reuse", i, n)] for i in range(rounds + 1) for n in prompts.TEMPLATES)
    ms = {side: round(median(values) * 1000, 1) for side, values in ttft.items()}
    return {
        "benchmark": "prompt-reuse",
        "rounds": rounds,
        "threads": threads,
        "max_tokens": tokens,
        "templates": list(prompts.TEMPLATES),
        "prefix_tokens": {
            name: len(llm.llama.tokenize(text.encode("utf-8"), add_bos=True, special=True))
            for name, text in prompts.TEMPLATES.items()
        },
        "ttft_ms": ms,
        "total_ms": {side: round(median(values) * 1000, 1) for side, values in total.items()},
        "cache": cache.report(),
        "same_text": f"{same}/{(rounds + 1) * len(prompts.TEMPLATES)}",
        "plain_vs_none_ttft": round(ms["plain"] / ms["none"], 3),
        "ratios": {"reuse_vs_none_ttft": round(ms["reuse"] / ms["none"], 3)},
        "note": "median time to the first streamed chunk over the templates and rounds; one process, no queue",
        "host": host_facts(),
    }
