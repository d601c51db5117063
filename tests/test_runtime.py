"""Worker start-up applies the plan and makes the models ready; prefork and lazy mode on real workers.

The prefork test is the one the OpenMP hang would fail: a grok worker with 2 pool children x 2 threads,
models loaded in the parent, both children generating within the task time limit.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from xnai_tasks.bench.harness import start_worker, stop_worker, wait_online
from xnai_tasks.client.sync import Client
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import RefusedError, SettingsError
from xnai_tasks.models.model_file import resolve_model
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.plan.host import plan_for
from xnai_tasks.plan.planner import GiB, Host, RolePlan, for_concurrency, format_plan
from xnai_tasks.security import publish
from xnai_tasks.security.key_admin import init_keys, revoke
from xnai_tasks.settings import Settings
from xnai_tasks.worker.code import extract_code, validate_code
from xnai_tasks.worker.sentences import sentences

from support import run_xnai, short_home

# ---------------------------------------------------------------- pure logic (fast)


def test_for_concurrency_keeps_within_the_cpus() -> None:
    plan = RolePlan(
        role="grok", processes=1, threads_per_process=3, cpus=[2, 3, 4], model_mode="preload", ram_share_bytes=1 << 30
    )
    assert for_concurrency(plan, None) == plan
    assert (for_concurrency(plan, 3).processes, for_concurrency(plan, 3).threads_per_process) == (3, 1)
    assert for_concurrency(plan, 2).threads_per_process == 1
    assert for_concurrency(plan, 8).threads_per_process == 1  # never 0
    forced = for_concurrency(plan, 2, threads=2)  # XNAI_THREADS: the user's word, may oversubscribe
    assert (forced.processes, forced.threads_per_process) == (2, 2)


def test_plan_for_applies_model_mode_and_overrides(home: Path) -> None:
    host = Host(physical_cores=8, logical_cpus=list(range(8)), ram_bytes=16 * GiB)
    settings = Settings(home=home, model_mode="lazy", plan_overrides='{"grok":{"processes":3,"threads_per_process":1}}')
    plan = plan_for(settings, host)
    assert all(role.model_mode == "lazy" for role in plan.roles.values())
    assert (plan.roles["grok"].processes, plan.roles["grok"].threads_per_process) == (3, 1)
    text = format_plan(plan)
    assert "reserved for the system: CPUs 0-1" in text and "grok" in text and "2-7" in text
    bad = Settings(home=home, plan_overrides='{"grok":{"processes":4,"threads_per_process":2}}')
    with pytest.raises(SettingsError, match="XNAI_PLAN: plan for grok"):
        plan_for(bad, host)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("XNAI_MODEL_MODE", "eager"),
        ("XNAI_KEEP_ALIVE", "0"),
        ("XNAI_MODEL_RAM_MB", "lots"),
        ("XNAI_THREADS", "0"),
        ("XNAI_PLAN", "{not json"),
        ("XNAI_PLAN", '{"nobody": {}}'),
        ("XNAI_PLAN", '{"grok": {"speed": 3}}'),
        ("XNAI_PLAN", "[1]"),
        ("XNAI_LLM_SAFE", "maybe"),
        ("XNAI_LLM_PROBE_TIMEOUT", "1"),
        ("XNAI_MAX_DELIVERIES", "0"),
        ("XNAI_TASK_MODULES", "tests/tasks.py"),
        ("XNAI_LLM_PROBE_RUNNER", "probe runner"),
    ],
)
def test_new_settings_name_the_variable(home: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"XNAI_HOME": str(home), name: value})
    assert name in str(err.value) and "\n" not in str(err.value)


def test_model_settings_round_trip(home: Path) -> None:
    env = {
        "XNAI_HOME": str(home),
        "XNAI_MODEL_MODE": "lazy",
        "XNAI_KEEP_ALIVE": "7",
        "XNAI_MODEL_RAM_MB": "512",
        "XNAI_THREADS": "2",
        "XNAI_PLAN": '{"grok": {"processes": 2}}',
    }
    settings = Settings.from_env(env)
    assert (settings.model_mode, settings.keep_alive, settings.model_ram_mb, settings.threads) == ("lazy", 7, 512, 2)
    assert settings.plan_override_map == {"grok": {"processes": 2}}
    assert Settings.from_env(settings.to_env()) == settings


def test_extract_and_validate_code() -> None:
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nbye", "python") == "def f():\n    return 1"
    assert extract_code("```rust code:\nfn main() {}\n```", "rust") == "fn main() {}"
    assert extract_code("x = 1\n", "python") == "x = 1"
    good = validate_code("def f(a, b):\n    return a + b\n", "python")
    assert good["valid"] and good["parses"] and good["compiles"] and good["defines"] == ["f"]
    bad = validate_code("def f(:\n", "python")
    assert bad["valid"] is False and bad["parses"] is False and "SyntaxError at line 1" in bad["error"]
    # parses but does not compile: the two checks are reported separately
    nonlocal_at_top = validate_code("def f():\n    nonlocal x\n", "python")
    assert nonlocal_at_top["parses"] is True and nonlocal_at_top["compiles"] is False
    assert validate_code("", "python")["valid"] is False
    other = validate_code("fn main() {}", "Rust")
    assert other["validated"] is False and other["valid"] is None and "not validated" in other["note"]


def test_sentences() -> None:
    assert sentences("One here. Two there! Three?\n\nFour") == ["One here.", "Two there!", "Three?", "Four"]


def test_xnai_plan_command(home: Path) -> None:
    done = run_xnai(["plan", "--json"], Settings(home=home), timeout=60)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert set(plan["roles"]) == {"copilot", "cline", "grok", "curation"}
    for role in plan["roles"].values():
        assert role["processes"] * role["threads_per_process"] <= len(role["cpus"])
    text = run_xnai(["plan"], Settings(home=home), timeout=60)
    assert text.returncode == 0 and "processes" in text.stdout and "reserved for the system" in text.stdout
    bad = run_xnai(["plan"], env={"XNAI_HOME": str(home), "XNAI_PLAN": '{"grok": {"cpus": [4096]}}'}, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "XNAI_PLAN" in bad.stderr


# ---------------------------------------------------------------- a bad model stops the worker at start


@pytest.mark.parametrize("case", ["not_gguf", "wrong_checksum"])
def test_a_bad_model_is_one_clear_line_and_exit_1(home: Path, case: str) -> None:
    init_keys(home)
    model = home / "other.gguf"
    if case == "not_gguf":
        model.write_bytes(b"PK\x03\x04 not a model")
        expected = "not a GGUF file"
    else:
        model.write_bytes(b"GGUF" + b"\0" * 1000)
        (home / "other.gguf.sha256").write_text("0" * 64 + "  other.gguf\n")
        expected = "has sha256"
    settings = Settings(home=home, llm_model=model)
    with EmbeddedRedis(settings):  # the worker finds its broker (an unreachable one is exit 6 before anything)
        done = run_xnai(["worker", "cline"], settings, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and expected in lines[0] and "xnai worker cline" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_batching_worker_whose_encoder_process_cannot_load_the_model_is_one_line_and_exit_1(home: Path) -> None:
    # Given a batching curation worker's encoder: a folder transformers cannot load (config and weights not a model)
    init_keys(home)
    real = resolve_model("encoder", Settings(home=home)).path
    model = home / "broken-encoder"
    shutil.copytree(real, model, ignore=shutil.ignore_patterns("*.safetensors"))
    (model / "model.safetensors").write_bytes(b"not safetensors")
    settings = Settings(home=home, encoder_model=model, batch=True)
    # When the worker starts on a reachable Redis
    with EmbeddedRedis(settings):
        done = run_xnai(["worker", "curation"], settings, timeout=120)
    # Then it stops at start with one line saying why its encoder process could not load it, not a worker whose
    # every task would fail
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "xnai worker curation" in lines[0], done.stderr[-2000:]
    assert "encoder process ended" in lines[0]
    assert "it could not start: SafetensorError: Error while deserializing header" in lines[0]
    assert "Traceback" not in done.stderr


def test_a_worker_whose_key_is_revoked_does_not_start(home: Path) -> None:
    # Given the copilot's key revoked (it has no other)
    keyring = init_keys(home)
    kid = next(entry.kid for entry in keyring.entries() if entry.agent == "copilot")
    revoke(home, kid)
    settings = Settings(home=home)
    # When its worker starts on a reachable Redis
    with EmbeddedRedis(settings):
        done = run_xnai(["worker", "copilot"], settings, timeout=120)
    # Then it stops before it connects: one line naming the key problem (exit 2), not a worker whose every result
    # would fail
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "xnai worker copilot" in lines[0] and "copilot" in lines[0].split("cannot start")[1]
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- real workers


@pytest.fixture
def grok_stack(request: pytest.FixtureRequest) -> Iterator[tuple[psutil.Process, Client]]:
    """A grok worker alone on a private Redis, with the settings the test passes (indirect parametrize).

    Not a :class:`Stack`: stopping a Stack kills every descendant of this process, the session's stack too.
    """
    home = short_home()
    settings = Settings(home=home, **request.param)
    init_keys(home)
    # A Client signs with a process-wide key (publish.use_agent): give the session's back afterwards.
    signer = publish.process_source()
    with EmbeddedRedis(settings):
        control = create_app(settings, main="xnai_test_grok")
        proc = start_worker(settings, "grok")
        client = Client(settings)
        try:
            wait_online(proc, control, "grok", timeout=180)
            yield psutil.Process(proc.pid), client
        finally:
            client.close()
            control.close()
            stop_worker(proc)
            publish._signers.process = signer
    shutil.rmtree(home, ignore_errors=True)


def _health_models(client: Client) -> dict[str, dict]:  # type: ignore[type-arg]
    return {m["kind"]: m for m in client.submit("grok", "health").get(timeout=60)["models"]}


PREFORK = {"threads": 2, "plan_overrides": '{"grok":{"processes":2}}', "task_time_limit": 60}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("grok_stack", [PREFORK], indirect=True)
def test_preloaded_grok_answers_llm_tasks_in_both_children(grok_stack: tuple[psutil.Process, Client]) -> None:
    worker, client = grok_stack
    children = {p.pid for p in worker.children()}
    assert len(children) == 2
    # both children answer LLM tasks within the 60 s time limit (the OpenMP hang after fork would not)
    pids: set[int] = set()
    for _ in range(6):
        handles = [client.submit("grok", "synthesize", prompt="Name a fruit.", max_tokens=8) for _ in range(4)]
        pids |= {h.get(timeout=90)["pid"] for h in handles}
        if len(pids) == 2:
            break
    assert pids == children
    # and the encoder works in the children too, with 2 torch threads
    result = client.submit("grok", "analyze", question="Pick a fruit", options=["apple", "bicycle"], max_tokens=4)
    assert result.get(timeout=90)["recommendation"] == "apple"
    models = _health_models(client)
    assert models["gguf"]["mode"] == "preload" and models["gguf"]["threads"] == 2 and models["gguf"]["loaded"]
    # the parent loaded the models once: the children did not load them again
    assert models["gguf"]["loads"] == 1 and models["encoder"]["loads"] == 1


LAZY = {"model_mode": "lazy", "keep_alive": 6.0, "model_ram_mb": 500, "plan_overrides": '{"grok":{"processes":1}}'}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("grok_stack", [LAZY], indirect=True)
def test_lazy_mode_loads_on_use_unloads_when_idle_and_refuses_over_budget(
    grok_stack: tuple[psutil.Process, Client],
) -> None:
    _, client = grok_stack
    models = _health_models(client)
    assert {m["mode"] for m in models.values()} == {"lazy"}
    assert not models["gguf"]["loaded"] and not models["encoder"]["loaded"]
    # first use loads the LLM in the child (420 MiB expected, within the 500 MiB cap)
    result = client.submit("grok", "synthesize", prompt="Say hi.", max_tokens=4).get(timeout=120)
    assert result["degraded"] is False and result["timings"]["load_s"] > 0
    models = _health_models(client)
    assert models["gguf"]["loaded"] and models["gguf"]["loads"] == 1 and not models["encoder"]["loaded"]
    # idle for keep_alive seconds: unloaded
    _wait_until(lambda: not _health_models(client)["gguf"]["loaded"], 30)
    # the encoder loads (120 MiB); the LLM on top of it would pass the cap: analyze degrades
    analysis = client.submit("grok", "analyze", question="Pick a fruit", options=["apple", "bicycle"]).get(timeout=120)
    assert analysis["degraded"] is True and "XNAI_MODEL_RAM_MB" in analysis["degraded_reason"]
    assert analysis["recommendation"] == "apple" and analysis["models"]["llm"] is None
    # synthesize with a context degrades to the context's most relevant sentences
    extract = client.submit(
        "grok", "synthesize", prompt="What colour is the sky?", context="The sky is blue. Grass is green."
    ).get(timeout=60)
    assert extract["degraded"] is True and "sky is blue" in extract["text"]
    # with no context to extract from, it is refused fast and clearly (a refusal: CLI exit 3)
    start = time.monotonic()
    with pytest.raises(RefusedError, match="refused"):
        client.submit("grok", "synthesize", prompt="Say hi.", max_tokens=4).get(timeout=60)
    assert time.monotonic() - start < 10
    _wait_until(lambda: not _health_models(client)["encoder"]["loaded"], 30)


def _wait_until(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.5)


def test_role_modules_do_not_import_model_libraries() -> None:
    # the client imports the role modules to learn the task names: that must stay cheap
    import subprocess
    import sys

    code = (
        "import sys, workers.cline, workers.grok, workers.curation, workers.copilot\n"
        "from xnai_tasks.worker.role_task import role_tasks\n"
        "role_tasks()\n"
        "print(','.join(m for m in ('torch', 'transformers', 'llama_cpp', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""


def test_ram_cap_counts_the_models_already_loaded() -> None:
    from xnai_tasks.errors import OverBudgetError
    from xnai_tasks.models import ModelFile, ModelHolder, RamBudget

    def fake(name: str, mib: int) -> ModelFile:
        return ModelFile(
            name=name,
            kind="encoder",
            path=Path("/nowhere"),
            size_bytes=1,
            sha256=None,
            checked=False,
            ram_bytes=mib << 20,
            params={},
            default=False,
        )

    budget = RamBudget(500 << 20)
    plenty = lambda: 64 << 30  # noqa: E731
    small: ModelHolder[str] = ModelHolder(fake("small", 120), lambda: "s", "lazy", available_ram=plenty, budget=budget)
    big: ModelHolder[str] = ModelHolder(fake("big", 420), lambda: "b", "lazy", available_ram=plenty, budget=budget)
    assert big.get() == "b"  # alone it fits
    with pytest.raises(OverBudgetError, match=r"XNAI_MODEL_RAM_MB\): refused"):
        small.get()  # 120 + 420 > 500
    big.unload()
    assert small.get() == "s" and budget.held_bytes() == 120 << 20
    small.close()
    big.close()
