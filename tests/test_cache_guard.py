"""The semantic cache's guard: its rules on plain examples (vectors made up: pure logic), what a lookup
compares, and ``xnai cache eval`` on the development pairs with the real encoder (a quality bar on a fixed file
and a deterministic model)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from xnai_tasks.cache.evaluation import DEFAULT_PAIRS, Pair, decide_pair, evaluate
from xnai_tasks.cache.guard import Decision, Embedded, decide, lookup
from xnai_tasks.cache.request import request_text
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings

from support import run_xnai, short_home

DEV_PAIRS = Path(__file__).resolve().parent / "data" / "cache-dev.jsonl"


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    home = short_home()
    yield Settings(home=home)
    shutil.rmtree(home, ignore_errors=True)


def prompt(text: str, **rest: object) -> Embedded:
    """``text`` as grok.synthesize's prompt, its vector the unit x axis."""
    return Embedded(request=request_text("grok", "synthesize", {"prompt": text, **rest}), vector=[1.0, 0.0])


def judged(a: str, b: str, score: float = 0.95) -> Decision:
    """The guard's decision on ``b`` after ``a``, their vectors ``score`` apart in cosine."""
    new = prompt(b)
    return decide(prompt(a), Embedded(request=new.request, vector=[score, math.sqrt(1 - score * score)]))


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        ("Ways to shrink a 7B model.", "Ways to shrink a 70B model.", "numbers differ: [7] vs [70]"),
        ("What did users ask in 2024?", "What did users ask in 2025?", "numbers differ"),
        ("Should I enable acks_late?", "Should I not enable acks_late?", "negation differs"),
        ("Why retry a failed task?", "Why never retry a failed task?", "negation differs"),
        ("Is Python faster than Java?", "Is Java faster than Python?", "swapped roles: 'python' and 'java'"),
        ("Convert JSON to YAML.", "Convert YAML to JSON.", "swapped roles"),
        ("How do I encrypt a file with GPG?", "How do I decrypt a file with GPG?", "opposites"),
        ("Write a function that reverses a string.", "Write a function that reverses a list.", "edited in place"),
        ("Explain how to start a worker.", "Explain how to stop a worker.", "'start' -> 'stop'"),
        ("Translate 'good morning' into Greek.", "Translate 'good night' into Greek.", "quoted text differ"),
        ("Tune os.path for speed.", "Tune os.environ for speed.", "identifiers differ"),
    ],
)
def test_a_near_miss_is_refused_with_its_reason(a: str, b: str, why: str) -> None:
    # Given two requests the encoder finds very close (0.95), one asking something else
    # When the guard decides
    decision = judged(a, b)
    # Then it refuses, saying which rule in one line
    assert not decision.hit and why in decision.reason and "\n" not in decision.reason


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How many cores on an 8-core CPU?", "On an eight-core CPU, how many cores?"),
        ("Why can't a worker start?", "Why cannot a worker start?"),
        ("Explain how TCP congestion control works.", "How does congestion control in TCP work?"),
        ("How do I delete a branch in git?", "What is the command to remove a git branch?"),
        ("How do I merge two dictionaries?", "How do I merge two dicts?"),
    ],
)
def test_a_rephrasing_is_a_hit(a: str, b: str) -> None:
    # Given the same request worded another way (numbers as words, contractions, moved or new words)
    # Then the guard lets the earlier answer serve it
    decision = judged(a, b)
    assert decision.hit, decision.reason


def test_similarity_below_the_floor_is_a_miss_whatever_the_words() -> None:
    decision = judged("Explain Redis persistence.", "Explain Redis persistence!", score=0.5)
    assert not decision.hit and "below" in decision.reason and decision.score == pytest.approx(0.5)


def test_a_lookup_compares_the_prompt_only_within_the_same_task_and_arguments() -> None:
    # Given a request's text: its prompt-like argument, whitespace collapsed; the rest is its scope
    first = request_text("grok", "synthesize", {"prompt": "  Explain   AOF. ", "max_tokens": 64})
    assert first.text == "Explain AOF." and first.scope != request_text("grok", "synthesize", {"prompt": "x"}).scope
    assert request_text("cline", "generate_code", {"spec": "a parser", "language": "go"}).text == "a parser"
    # When the same prompt comes with other arguments (grounding context)
    decision = decide(prompt("Explain AOF."), prompt("Explain AOF.", context="notes"))
    # Then it is a miss; the same prompt in the same scope is a hit
    assert not decision.hit and decision.reason == "another task or other arguments"
    assert decide(prompt("Explain AOF."), prompt("explain  AOF.")).hit
    # And a task with no request in words, or a request without it, has nothing to compare
    with pytest.raises(UsageError, match=r"curation\.embed has no request text"):
        request_text("curation", "embed", {"texts": ["x"]})
    with pytest.raises(UsageError, match="needs a non-empty prompt"):
        request_text("grok", "synthesize", {"prompt": "  "})


def test_a_lookup_takes_the_most_similar_earlier_request_the_guard_lets_through() -> None:
    # Given earlier requests: a near miss closest to the new one, a rephrasing a little further
    new = prompt("Explain how to start a worker.")
    near_miss = Embedded(request=prompt("Explain how to stop a worker.").request, vector=[0.99, math.sqrt(1 - 0.99**2)])
    rephrased = Embedded(request=prompt("How do I start a worker?").request, vector=[0.9, math.sqrt(1 - 0.81)])
    # When the new request is looked up
    index, decision = lookup(new, [near_miss, rephrased])
    # Then the rephrasing serves it, and with nothing acceptable there is no hit
    assert index == 1 and decision is not None and decision.hit
    assert lookup(new, [near_miss])[0] is None and lookup(new, [])[1] is None


def test_the_evaluation_decides_each_pair_as_a_live_lookup() -> None:
    # Given two pairs and made-up vectors
    pairs = [Pair(a="Start a worker.", b="Stop a worker.", same=False), Pair(a="Start it.", b="Start it.", same=True)]
    vectors = [[1.0, 0.0], [0.96, 0.28], [0.0, 1.0], [0.0, 1.0]]
    # When they are evaluated
    report = evaluate(pairs, vectors)
    # Then each decision is the lookup's of b after a, and the totals count them
    earlier = Embedded(request=request_text("grok", "synthesize", {"prompt": "Start a worker."}), vector=vectors[0])
    new = Embedded(request=request_text("grok", "synthesize", {"prompt": "Stop a worker."}), vector=vectors[1])
    live = lookup(new, [earlier])[1]
    assert live is not None and not live.hit
    assert report["pairs"][0] == {"a": "Start a worker.", "b": "Stop a worker.", "same": False} | live.to_dict()
    assert decide_pair(pairs[1], vectors[2], vectors[3]).hit
    assert (report["positives"], report["negatives"], report["true_hits"], report["false_hits"]) == (1, 1, 1, 0)


def test_a_malformed_pairs_file_is_one_line_and_exit_2(settings: Settings) -> None:
    bad = settings.home / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y", "same": true}\n{"a": "x"}\n')
    done = run_xnai(["cache", "eval", str(bad)], settings)
    assert done.returncode == 2 and done.stderr.strip().endswith(
        ':2: expected {"a": TEXT, "b": TEXT, "same": true|false}'
    )
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_package_ships_the_development_pairs() -> None:
    assert DEFAULT_PAIRS.read_bytes() == DEV_PAIRS.read_bytes()


@pytest.mark.slow
def test_cache_eval_on_the_development_pairs_meets_the_bar(settings: Settings) -> None:
    # Given 15 paraphrase pairs and 15 near misses, embedded by the real encoder in a real `xnai cache eval`
    done = run_xnai(["cache", "eval", str(DEV_PAIRS), "--json"], settings, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # Then at most 1 near miss is a hit and at least 9 paraphrases are
    assert (report["positives"], report["negatives"]) == (15, 15)
    assert report["false_hits"] <= 1 and report["true_hits"] >= 9, report
    # And every pair has its decision, score and reason
    assert len(report["pairs"]) == 30
    assert all({"hit", "score", "reason", "same"} <= set(row) for row in report["pairs"])
