"""Model resolution, checksums, loading, inference helpers, holders, and the preload-then-fork rule.

Tests marked ``slow`` use the real default models (Gemma 3 270M GGUF, all-MiniLM-L6-v2). The fork and
memory scenarios run in a fresh interpreter so no thread of the test process is inherited by a fork.
Run with ``-s`` to see the measured timings and PSS figures.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from xnai_tasks.errors import ModelError, OverBudgetError, UsageError
from xnai_tasks.models import (
    LLM,
    MANIFEST_PATH,
    Encoder,
    ModelFile,
    ModelHolder,
    ModelRegistry,
    Progress,
    chunk_text,
    cosine,
    embed,
    generate,
    load_encoder,
    load_llm,
    load_manifest,
    resolve_model,
    sha256_file,
)
from xnai_tasks.models.probe import probe_llm
from xnai_tasks.plan.planner import RolePlan
from xnai_tasks.settings import Settings

REPO = Path(__file__).resolve().parent.parent
EVAL = Path(__file__).resolve().parent / "data" / "cache-dev.jsonl"
MiB = 1024 * 1024

needs_models = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("llama_cpp", "torch", "transformers")),
    reason="the models extra is not installed",
)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(home=tmp_path_factory.mktemp("xnai-home"))


@pytest.fixture(scope="session")
def gguf(settings: Settings) -> ModelFile:
    return resolve_model("gguf", settings)


@pytest.fixture(scope="session")
def encoder_file(settings: Settings) -> ModelFile:
    return resolve_model("encoder", settings)


@pytest.fixture(scope="session")
def llm_options(settings: Settings, gguf: ModelFile) -> dict[str, Any]:
    """The load options the probe found to work on this host (the safe ones where AMX kernels crash)."""
    verdict = probe_llm(settings, gguf, 2)
    assert verdict.options is not None, verdict.reason
    return verdict.options


@pytest.fixture(scope="session")
def llm(gguf: ModelFile, llm_options: dict[str, Any]) -> LLM:
    start = time.monotonic()
    model = load_llm(gguf.path, int(gguf.params["n_ctx"]), 2, params=gguf.params, options=llm_options)
    print(f"\n[timing] LLM load: {time.monotonic() - start:.2f} s")
    return model


@pytest.fixture(scope="session")
def encoder(encoder_file: ModelFile) -> Encoder:
    start = time.monotonic()
    model = load_encoder(encoder_file.path, 2)
    print(f"\n[timing] encoder load (with torch/transformers import): {time.monotonic() - start:.2f} s")
    return model


def write_manifest(tmp_path: Path, kind: str, **changes: Any) -> Path:
    """A copy of the real manifest with one entry changed."""
    data = json.loads(MANIFEST_PATH.read_text())
    for entry in data["models"]:
        if entry["kind"] == kind:
            entry.update(changes)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- pure helpers (fast)


def test_manifest_reads() -> None:
    entries = load_manifest()
    assert set(entries) == {"gguf", "encoder"}
    assert entries["gguf"].params["n_ctx"] > 0
    assert "model.safetensors" in entries["encoder"].files


def test_chunk_text() -> None:
    text = " ".join(f"w{i}" for i in range(10))
    chunks = chunk_text(text, size=4, overlap=1)
    assert chunks == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert chunk_text("", 4, 1) == []
    assert chunk_text("one\ntwo  three", 10, 0) == ["one\ntwo  three"]
    with pytest.raises(UsageError):
        chunk_text(text, size=4, overlap=4)


def test_cosine() -> None:
    assert cosine([1.0, 0.0], [2.0, 0.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)
    assert cosine([0.0, 0.0], [1.0, 1.0]) == 0.0
    with pytest.raises(UsageError):
        cosine([1.0], [1.0, 2.0])


def fake_file(ram_bytes: int = 100 * MiB) -> ModelFile:
    return ModelFile(
        name="fake",
        kind="encoder",
        path=Path("/nowhere"),
        size_bytes=10,
        sha256=None,
        checked=False,
        ram_bytes=ram_bytes,
        params={},
        default=False,
    )


def test_lazy_holder_loads_on_use_and_unloads_when_idle() -> None:
    loads: list[int] = []

    def loader() -> str:
        loads.append(1)
        return "model"

    holder: ModelHolder[str] = ModelHolder(fake_file(), loader, "lazy", keep_alive=3600, available_ram=lambda: 8 << 30)
    assert not holder.loaded
    with holder.use() as model:
        assert model == "model"
        assert not holder.unload_if_idle(now=time.monotonic() + 7200)  # in use: kept
    assert holder.unload_if_idle(now=time.monotonic() + 7200)
    assert not holder.loaded
    assert holder.get() == "model" and len(loads) == 2
    info = holder.describe()
    assert info["mode"] == "lazy" and info["loaded"] and info["loads"] == 2 and info["ram_bytes"] == 100 * MiB
    holder.close()


def test_lazy_holder_reaper_thread_unloads() -> None:
    holder: ModelHolder[str] = ModelHolder(
        fake_file(), lambda: "model", "lazy", keep_alive=0.1, available_ram=lambda: 8 << 30
    )
    holder.get()
    deadline = time.monotonic() + 5
    while holder.loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not holder.loaded
    holder.close()


def test_holder_refuses_over_budget() -> None:
    holder: ModelHolder[str] = ModelHolder(
        fake_file(ram_bytes=2 << 30), lambda: "model", "lazy", available_ram=lambda: 1 << 30
    )
    with pytest.raises(OverBudgetError, match="refused") as info:
        holder.get()
    assert info.value.exit_code == 3
    assert "\n" not in str(info.value)


def test_preload_holder_is_not_idle_unloaded_and_none_refuses() -> None:
    holder: ModelHolder[str] = ModelHolder(
        fake_file(), lambda: "m", "preload", keep_alive=0, available_ram=lambda: 8 << 30
    )
    holder.load()
    assert not holder.unload_if_idle(now=time.monotonic() + 10)
    none: ModelHolder[str] = ModelHolder(fake_file(), lambda: "m", "none")
    with pytest.raises(ModelError, match="disabled"):
        none.get()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_tty() -> None:
    stream = _Tty()
    with Progress("hashing x", 100, stream) as bar:
        bar.update(50)
        bar.update(50)
    out = stream.getvalue()
    assert out.startswith("\rhashing x [") and "100.0%" in out and out.endswith(" s\n")


def test_progress_logs_without_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="xnai_tasks.models")
    with Progress("hashing y", 100, io.StringIO()) as bar:
        bar.update(100)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("hashing y: started") and messages[-1].startswith("hashing y: done")


# ---------------------------------------------------------------- resolution and checksums (real files)


@pytest.mark.slow
def test_resolve_defaults(settings: Settings, gguf: ModelFile, encoder_file: ModelFile) -> None:
    assert gguf.default and gguf.checked and gguf.path.parent == settings.home / "models"
    assert gguf.path.stat().st_size == gguf.size_bytes == 253113024
    assert gguf.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert encoder_file.default and encoder_file.checked and (encoder_file.path / "model.safetensors").is_file()
    start = time.monotonic()
    assert resolve_model("gguf", settings) == gguf  # the checksum is cached: no 253 MB re-hash
    assert time.monotonic() - start < 0.2
    cache = json.loads((settings.home / "models" / "verified.json").read_text())
    assert cache[str(gguf.path)]["sha256"] == gguf.sha256


@pytest.mark.slow
def test_corrupted_default_is_reassembled(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    model = resolve_model("gguf", settings)
    with model.path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\0\1\2\3")
    again = resolve_model("gguf", settings)
    assert sha256_file(again.path) == model.sha256


@pytest.mark.slow
def test_truncated_copy_raises(tmp_path: Path, gguf: ModelFile, settings: Settings) -> None:
    truncated = tmp_path / "truncated.gguf"
    with gguf.path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(50 * MiB))
    manifest = write_manifest(tmp_path, "gguf", source={"path": str(truncated)})
    with pytest.raises(ModelError, match=r"is 52428800 bytes, expected 253113024 \(truncated") as info:
        resolve_model("gguf", settings, manifest)
    assert "\n" not in str(info.value)
    # Named by XNAI_LLM_MODEL there is no known checksum: llama.cpp's refusal becomes a ModelError.
    override = resolve_model("gguf", Settings(home=settings.home, llm_model=truncated))
    assert not override.checked
    with pytest.raises(ModelError, match="cannot load"):
        load_llm(override.path, 512, 1)


@pytest.mark.slow
def test_wrong_checksum_raises(tmp_path: Path, gguf: ModelFile, settings: Settings) -> None:
    manifest = write_manifest(tmp_path, "gguf", source={"path": str(gguf.path)}, sha256="0" * 64)
    with pytest.raises(ModelError, match=r"has sha256 a5fd3b62230a…, expected 000000000000…"):
        resolve_model("gguf", settings, manifest)
    # A sidecar <file>.sha256 next to an override is honoured.
    copy = tmp_path / "other.gguf"
    os.link(gguf.path, copy)
    (tmp_path / "other.gguf.sha256").write_text("f" * 64 + "  other.gguf\n")
    with pytest.raises(ModelError, match="has sha256"):
        resolve_model("gguf", Settings(home=settings.home, llm_model=copy))
    (tmp_path / "other.gguf.sha256").write_text(f"{gguf.sha256}  other.gguf\n")
    assert resolve_model("gguf", Settings(home=settings.home, llm_model=copy)).checked


@pytest.mark.slow
def test_missing_paths_raise(tmp_path: Path, settings: Settings, encoder_file: ModelFile) -> None:
    manifest = write_manifest(tmp_path, "gguf", source={"path": str(tmp_path / "nope.gguf")})
    with pytest.raises(ModelError, match=r"nope\.gguf is missing"):
        resolve_model("gguf", settings, manifest)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\3\4 not a gguf")
    with pytest.raises(ModelError, match="not a GGUF"):
        resolve_model("gguf", Settings(home=settings.home, llm_model=not_gguf))
    with pytest.raises(ModelError, match="not a folder"):
        resolve_model("encoder", Settings(home=settings.home, encoder_model=not_gguf))
    unsafe = tmp_path / "enc"
    unsafe.mkdir()
    (unsafe / "config.json").write_text("{}")
    (unsafe / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ModelError, match=r"pytorch_model.bin is an unsafe object-serialized file, refused"):
        resolve_model("encoder", Settings(home=settings.home, encoder_model=unsafe))
    manifest = write_manifest(tmp_path, "encoder", source={"path": str(tmp_path / "nowhere")})
    with pytest.raises(ModelError, match="is missing"):
        resolve_model("encoder", settings, manifest)
    override = resolve_model("encoder", Settings(home=settings.home, encoder_model=encoder_file.path))
    assert not override.checked and override.path == encoder_file.path


# ---------------------------------------------------------------- inference (real models)


@needs_models
@pytest.mark.slow
def test_embeddings_rank_paraphrases_above_unrelated(encoder: Encoder) -> None:
    rows = [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()]
    same = [r for r in rows if r["same"]]
    texts = [t for r in rows for t in (r["a"], r["b"])]
    embed(encoder, texts[:4])  # warm-up: the first call pays one-off allocations
    start = time.monotonic()
    vectors = embed(encoder, texts, batch_size=32)
    seconds = time.monotonic() - start
    print(f"\n[timing] embeddings: {len(texts) / seconds:.0f} texts/s at 2 threads, batch 32")
    assert len(vectors) == len(texts) and len(vectors[0]) == 384
    assert all(abs(cosine(v, v) - 1.0) < 1e-5 for v in vectors)
    a, b, c = embed(encoder, [same[0]["a"], same[0]["b"], same[4]["a"]])
    assert cosine(a, b) > cosine(a, c) + 0.2
    sims: dict[bool, list[float]] = {True: [], False: []}
    for i, row in enumerate(rows):
        sims[bool(row["same"])].append(cosine(vectors[2 * i], vectors[2 * i + 1]))
    print(
        f"[info] cosine paraphrase mean {sum(sims[True]) / len(sims[True]):.3f} min {min(sims[True]):.3f}; "
        f"hard negatives mean {sum(sims[False]) / len(sims[False]):.3f} max {max(sims[False]):.3f}"
    )


@needs_models
@pytest.mark.slow
def test_generate(llm: LLM) -> None:
    generate(llm, "Hello", 4)  # warm-up
    out = generate(llm, "Write a Python function that reverses a string.", 32, temperature=0.2, seed=1)
    assert out["text"] and out["prompt_tokens"] > 0 and 0 < out["completion_tokens"] <= 32
    print(f"\n[timing] generate: {out['completion_tokens'] / out['seconds']:.1f} tokens/s at 2 threads")
    with pytest.raises(ModelError, match="does not fit"):
        generate(llm, "word " * 5000, 16)


@needs_models
@pytest.mark.slow
def test_registry_for_role(settings: Settings) -> None:
    plan = RolePlan(
        role="grok", processes=1, threads_per_process=1, cpus=[0], model_mode="lazy", ram_share_bytes=1 << 30
    )
    registry = ModelRegistry.for_role("grok", settings, plan, keep_alive=3600)
    assert [h["loaded"] for h in registry.describe()] == [False, False]
    with registry.encoder.use() as enc:
        assert len(embed(enc, ["hello"])[0]) == 384
    described = {d["kind"]: d for d in registry.describe()}
    assert described["encoder"]["loaded"] and not described["gguf"]["loaded"]
    assert described["gguf"]["size_bytes"] == 253113024
    registry.close()
    with pytest.raises(ModelError, match="no LLM"):
        ModelRegistry.for_role("curation", settings, plan).llm  # noqa: B018


# ---------------------------------------------------------------- fork and memory (fresh interpreters)

SCENARIO = r"""
import gc, json, os, sys, time
from pathlib import Path
import psutil
from xnai_tasks import models as m

kind, mode, path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
n_children, parent_threads, child_threads = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])

def load(threads):
    if kind == "gguf":
        return m.load_llm(path, 2048, threads, options=json.loads(os.environ["SCENARIO_LLM_OPTIONS"]))
    return m.load_encoder(path, threads)

def work(model, i):
    start = time.monotonic()
    if kind == "gguf":
        m.set_llm_threads(model, child_threads)
        out = m.generate(model, "Name three colours.", 16, seed=i)
        return {"tokens": out["completion_tokens"], "text": out["text"][:40], "seconds": out["seconds"]}
    m.set_encoder_threads(child_threads)
    vectors = m.embed(model, ["a sentence to embed"] * 64)
    return {"vectors": len(vectors), "seconds": round(time.monotonic() - start, 3)}

def pss(pid):
    return psutil.Process(pid).memory_full_info().pss

start = time.monotonic()
if mode == "single":
    model = load(child_threads)
    result = work(model, 0)
    print(json.dumps({"pss": [pss(os.getpid())], "results": [result]}))
    sys.exit(0)
model = None
if mode == "preload":
    model = load(parent_threads)  # no inference in the parent
    gc.collect()
    gc.freeze()
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pids = []
for i in range(n_children):
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        try:
            if model is None:
                model = load(child_threads)  # kept referenced until measured
            result = work(model, i)
        except BaseException as exc:
            result = {"error": repr(exc)}
        os.write(ready_w, (json.dumps(result) + "\n").encode())
        os.read(go_r, 1)
        os._exit(0)
    pids.append(pid)
os.close(ready_w)
os.close(go_r)
with os.fdopen(ready_r) as lines:
    results = [json.loads(next(lines)) for _ in pids]
figures = [pss(os.getpid())] + [pss(pid) for pid in pids]
os.write(go_w, b"x" * len(pids))
for pid in pids:
    os.waitpid(pid, 0)
print(json.dumps({"pss": figures, "results": results, "seconds": round(time.monotonic() - start, 2)}))
"""


def run_scenario(
    kind: str,
    mode: str,
    path: Path,
    children: int,
    parent_threads: int,
    child_threads: int,
    timeout: float,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run SCENARIO in its own process group; on timeout the whole group (children too) is killed."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "SCENARIO_LLM_OPTIONS": json.dumps(options or {}),
    }
    args = [kind, mode, str(path), str(children), str(parent_threads), str(child_threads)]
    proc = subprocess.Popen(
        [sys.executable, "-c", SCENARIO, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{kind}/{mode}: children did not finish within {timeout} s (hang after fork?)")
    assert proc.returncode == 0, err[-2000:]
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert all("error" not in r for r in data["results"]), data["results"]
    return data


@needs_models
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_preload_then_fork_does_not_hang(gguf: ModelFile, llm_options: dict[str, Any]) -> None:
    """Parent loads with 2 threads and runs no inference; two forked children each generate 16 tokens."""
    start = time.monotonic()
    data = run_scenario(
        "gguf", "preload", gguf.path, children=2, parent_threads=2, child_threads=1, timeout=60, options=llm_options
    )
    assert time.monotonic() - start < 60
    assert len(data["results"]) == 2 and all(r["tokens"] > 0 for r in data["results"])
    print(f"\n[fork] 2 children, 16 tokens each: {data['results']}")


def _mb(values: list[int]) -> str:
    return f"{sum(values) / MiB:.0f} MiB (" + " + ".join(f"{v / MiB:.0f}" for v in values) + ")"


@needs_models
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["gguf", "encoder"])
def test_pss_preload_vs_independent(
    kind: str, gguf: ModelFile, encoder_file: ModelFile, llm_options: dict[str, Any], tmp_path: Path
) -> None:
    """Reported, not asserted: PSS of preload + 3 children, 3 self-loading children, one process.

    The model is copied first: PSS splits a mapped file's pages among every process mapping them, and
    this test process may have the same file mapped by an earlier test.
    """
    if kind == "gguf":
        path = tmp_path / gguf.path.name
        shutil.copyfile(gguf.path, path)
    else:
        path = tmp_path / "encoder"
        shutil.copytree(encoder_file.path, path)
    single = run_scenario(kind, "single", path, 1, 1, 1, timeout=180, options=llm_options)
    preload = run_scenario(kind, "preload", path, 3, 1, 1, timeout=180, options=llm_options)
    independent = run_scenario(kind, "independent", path, 3, 1, 1, timeout=180, options=llm_options)
    print(
        f"\n[pss {kind}] single process: {_mb(single['pss'])}"
        f"\n[pss {kind}] parent preload + 3 children: {_mb(preload['pss'])}"
        f"\n[pss {kind}] parent + 3 independently loading children: {_mb(independent['pss'])}"
    )
