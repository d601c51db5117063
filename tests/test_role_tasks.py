"""The role tasks on the real default models, end to end through the real role workers of the stack.

Each role's worker preloaded its models in the parent; these tasks run in its pool children. Outputs of
a 270M base model are not judged for quality: the tests check the shape, the counts, the honesty of the
validation report, and what an encoder must get right (a paraphrase is closer than an unrelated text).
"""

from __future__ import annotations

import ast

import pytest

from xnai_tasks.client.sync import Client
from xnai_tasks.errors import TaskFailedError
from xnai_tasks.models import cosine
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import metric_value, scrape, wait_for_metric

pytestmark = pytest.mark.slow

TIMEOUT = 180
LLM = "gemma-3-270m-q4_k_m"
ENCODER = "all-MiniLM-L6-v2"


def call(client: Client, role: str, task: str, **kwargs: object) -> dict:  # type: ignore[type-arg]
    result = client.submit(role, task, **kwargs).get(timeout=TIMEOUT)
    assert isinstance(result, dict)
    return result


def test_health_reports_the_preloaded_models(stack: Stack, client: Client) -> None:
    expected = {"copilot": {ENCODER}, "cline": {LLM}, "grok": {LLM, ENCODER}, "curation": {ENCODER}}
    for role, names in expected.items():
        facts = call(client, role, "health")
        models = {m["name"]: m for m in facts["models"]}
        assert set(models) == names
        for model in models.values():
            # preloaded by the worker parent, inherited by the child that answered
            assert model["mode"] == "preload" and model["loaded"] and model["size_bytes"] > 50_000_000
            assert model["checksum_checked"] and model["threads"] >= 1


def test_cline_generate_docs(stack: Stack, client: Client) -> None:
    result = call(
        client, "cline", "generate_docs", topic="retrying failed tasks", context="Tasks retry.", max_tokens=24
    )
    assert result["model"] == LLM and result["topic"] == "retrying failed tasks"
    assert isinstance(result["text"], str)
    assert 0 < result["completion_tokens"] <= 24 and result["prompt_tokens"] > 0
    assert result["timings"]["generate_s"] > 0 and result["timings"]["tokens_per_s"] > 0


def test_llm_tokens_and_loaded_models_are_counted(stack: Stack, client: Client, stack_settings: Settings) -> None:
    # Given the token count of cline's LLM before
    tokens = {"role": "cline", "model": LLM}
    before = metric_value(scrape(stack_settings), "xnai_llm_tokens_total", **tokens)
    # When cline generates
    result = call(client, "cline", "generate_docs", topic="token counts", context="Tokens are counted.", max_tokens=8)
    # Then exactly its prompt and completion tokens are added, and each role's preloaded models show as loaded
    spent = result["prompt_tokens"] + result["completion_tokens"]
    samples = wait_for_metric(stack_settings, "xnai_llm_tokens_total", before + spent, **tokens)
    assert metric_value(samples, "xnai_llm_tokens_total", **tokens) == before + spent
    for role, model in (("cline", LLM), ("grok", LLM), ("grok", ENCODER), ("curation", ENCODER)):
        assert metric_value(samples, "xnai_model_loaded", role=role, model=model) == 1, (role, model)


def test_cline_generate_code_reports_honestly(stack: Stack, client: Client) -> None:
    result = call(client, "cline", "generate_code", spec="a function that adds two numbers", max_tokens=48, seed=1)
    report = result["validation"]
    assert result["language"] == "python" and report["validated"] and report["checks"] == ["ast.parse", "compile"]
    # the report must be the truth about the code returned
    try:
        ast.parse(result["code"])
        compile(result["code"], "<t>", "exec")
        truth = bool(result["code"].strip())
    except SyntaxError:
        truth = False
    assert report["valid"] is truth
    if not truth:
        assert report["error"]
    if result["finish_reason"] == "length":
        assert "truncated" in report
    other = call(client, "cline", "generate_code", spec="print hello", language="rust", max_tokens=8)
    assert other["validation"]["validated"] is False and other["validation"]["valid"] is None
    assert "not validated" in other["validation"]["note"]


def test_grok_synthesize(stack: Stack, client: Client) -> None:
    result = call(
        client, "grok", "synthesize", prompt="Why use a task queue?", context="Queues absorb bursts.", max_tokens=16
    )
    assert result["model"] == LLM and result["degraded"] is False
    assert 0 < result["completion_tokens"] <= 16 and result["pid"] > 0
    # temperature 0 and a seed: the same answer twice, both generated (the response cache is off)
    again = [
        client.submit(
            "grok", "synthesize", prompt="Name a colour.", max_tokens=8, temperature=0.0, seed=5, cache="off"
        ).get(timeout=TIMEOUT)
        for _ in range(2)
    ]
    assert all("cache" not in answer for answer in again)
    again = [answer["text"] for answer in again]
    assert again[0] == again[1]


def test_grok_analyze(stack: Stack, client: Client) -> None:
    options = [
        {"name": "SQLite", "description": "An embedded database in a single file. No server process is needed."},
        {"name": "bicycle", "description": "A vehicle with two wheels, powered by pedals."},
    ]
    result = call(
        client,
        "grok",
        "analyze",
        question="Which database suits an offline desktop app?",
        options=options,
        max_tokens=12,
    )
    assert result["degraded"] is False and result["models"] == {"llm": LLM, "encoder": ENCODER}
    assert [o["name"] for o in result["options"]] == ["SQLite", "bicycle"]
    assert result["recommendation"] == "SQLite" == result["ranking"][0]
    for option in result["options"]:
        assert -1 <= option["relevance"] <= 1 and isinstance(option["assessment"], str) and option["evidence"]
    assert 0 < result["completion_tokens"] <= 24
    with pytest.raises(TaskFailedError, match="options must be a list"):
        call(client, "grok", "analyze", question="q?", options=["only one"])


def test_curation_embed_paraphrase_is_closer_than_unrelated(stack: Stack, client: Client) -> None:
    texts = [
        "How does Redis persist data with an append-only file?",
        "Explain Redis AOF persistence.",
        "What is a good recipe for banana bread?",
    ]
    result = call(client, "curation", "embed", texts=texts)
    assert result["model"] == ENCODER and result["count"] == 3 and result["dim"] == 384
    a, b, other = result["vectors"]
    assert abs(cosine(a, a) - 1) < 1e-5
    assert cosine(a, b) > cosine(a, other) + 0.2
    assert result["timings"]["texts_per_s"] > 0


def test_index_then_a_paraphrased_query_finds_the_document(stack: Stack, client: Client) -> None:
    documents = [
        {"id": "t-aof", "text": "Redis can log every write to an append-only file and replay it after a restart."},
        {"id": "t-bread", "text": "Banana bread needs ripe bananas, flour, butter, sugar and an hour in the oven."},
        {"id": "t-bike", "text": " ".join(["Bicycles have two wheels and are powered by pedals."] * 60)},
    ]
    indexed = call(client, "curation", "index", documents=documents)
    assert indexed["documents"] == 3 and indexed["ids"] == ["t-aof", "t-bread", "t-bike"]
    assert indexed["chunks_per_document"]["t-bike"] > 1  # long text: several chunks
    assert indexed["bank_chunks"] >= indexed["chunks"]
    found = call(client, "curation", "search", query="How does Redis keep data safe across restarts?", k=3)
    assert found["hits"][0]["id"] == "t-aof"
    assert found["hits"][0]["chunk"].startswith("Redis can log")
    scores = [hit["score"] for hit in found["hits"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    # indexing an id again replaces it
    call(client, "curation", "index", documents=[{"id": "t-aof", "text": "Penguins live in Antarctica."}])
    again = call(client, "curation", "search", query="Where do penguins live?", k=1)
    assert again["hits"][0]["id"] == "t-aof" and "Penguins" in again["hits"][0]["chunk"]


def test_curation_classify(stack: Stack, client: Client) -> None:
    result = call(
        client, "curation", "classify", text="The striker scored twice in the cup final.", labels=["sport", "cooking"]
    )
    assert result["label"] == "sport" and result["ranking"] == ["sport", "cooking"]
    assert set(result["scores"]) == {"sport", "cooking"} and result["margin"] > 0


def test_bad_arguments_fail_clearly(stack: Stack, client: Client) -> None:
    with pytest.raises(TaskFailedError, match="documents"):
        call(client, "curation", "index", documents=[{"id": "x"}])
    with pytest.raises(TaskFailedError, match="texts must be a non-empty list"):
        call(client, "curation", "embed", texts=[])


def test_copilot_check_services(stack: Stack, client: Client) -> None:
    result = call(client, "copilot", "check_services")
    assert result["redis"]["reachable"] and result["healthy"] and result["missing_roles"] == []
    assert all(result["workers"][role] for role in ("copilot", "cline", "grok", "curation"))
