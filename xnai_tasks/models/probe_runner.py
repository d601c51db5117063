"""The LLM probe's child: load a GGUF with given llama.cpp options, generate a few tokens, print JSON.

Run as ``python -m xnai_tasks.models.probe_runner --model PATH --options JSON --threads N`` by
:mod:`xnai_tasks.models.probe`, always in a process of its own: a model that cannot run on this CPU
kills this process (SIGILL, SIGSEGV) or hangs it, never the worker that asked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

#: A prompt any model continues with ordinary text, greedily (temperature 0): the answer is repeatable.
PROBE_PROMPT = "The three primary colors are"
PROBE_TOKENS = 8
PROBE_CONTEXT = 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xnai_tasks.models.probe_runner")
    parser.add_argument("--model", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from pathlib import Path

    from xnai_tasks.models.loading import load_llm

    start = time.monotonic()
    llm = load_llm(Path(args.model), PROBE_CONTEXT, args.threads, options=json.loads(args.options))
    loaded = time.monotonic()
    out: Any = llm.llama.create_completion(prompt=PROBE_PROMPT, max_tokens=PROBE_TOKENS, temperature=0.0)
    done = time.monotonic()
    report = {
        "text": out["choices"][0]["text"],
        "completion_tokens": int(out["usage"]["completion_tokens"]),
        "load_s": round(loaded - start, 3),
        "generate_s": round(done - loaded, 3),
    }
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
