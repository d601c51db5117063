"""``xnai bench load``: N simulated agents against a private stack of the four role workers, real models.

Each agent runs a closed loop: submit one request, wait for its verified result (``TaskHandle.get``
checks the worker's signature), think 0-1 s, again. The requests are a realistic mix of the roles'
tasks with short LLM outputs (:data:`MIX`), their prompts drawn from a fixed pool with a skewed repeat
pattern (:class:`Workload`: a few hot prompts asked often, some paraphrased, most asked once), all
reproducible from ``--seed``. Figures: requests/s, latency (submit to verified result) and queue wait
percentiles (nearest-rank) per kind and overall, errors, refusals, lost requests (submitted minus ended),
availability, the stack's memory peak (sum of the PSS of every process it started, sampled every 0.5 s)
and its CPU use (% of the host).

Profiles (:data:`PROFILES`): ``baseline`` turns every fast path off, ``tuned`` turns every one on. Each fast
path (the circuit breaker first; the cache, batching and pool work next) adds its switch to :data:`FAST_PATHS`,
and :meth:`Profile.env` hands it to the workers.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from celery import states

from xnai_tasks.bench.harness import host_facts, model_stack, start_worker, stop_worker, wait_online
from xnai_tasks.bench.options import BenchOptions, LoadOptions
from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import constants as c
from xnai_tasks.errors import RefusedError, UsageError, XnaiError
from xnai_tasks.observability.report import percentile
from xnai_tasks.observability.telemetry import read_records
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

#: Named fast paths a profile switches (each fast path adds its own here: e.g. "cache", "batching").
#: A switch maps to the environment variable its workers read: name -> (variable, value when on, when off).
FAST_PATHS: dict[str, tuple[str, str, str]] = {
    # the circuit breaker per role and model (xnai_tasks/resilience): a failing LLM is not called at full rate
    "breaker": ("XNAI_BREAKER", "on", "off"),
    # load shedding at submit (xnai_tasks/admission): each role queue capped at 512; off: no cap (the client's)
    "shedding": ("XNAI_MAX_QUEUE", "512", "0"),
    # the response cache (xnai_tasks/cache): deterministic requests answered from Redis; off: every one runs
    "cache": ("XNAI_CACHE", "on", "off"),
    # dynamic batching of curation's encoder (xnai_tasks/batching): one-text tasks share encoder calls
    "batching": ("XNAI_BATCH", "on", "off"),
    # prompt reuse (xnai_tasks/models/prompt_cache.py): each LLM process keeps its templates' evaluated prefixes
    "prompt_cache": ("XNAI_PROMPT_CACHE_MB", "64", "0"),
}

SAMPLE_EVERY_S = 0.5
POLL_EVERY_S = 0.02
PROGRESS_EVERY_S = 0.5
#: Seconds the in-flight requests get to end once the load stops; what has not ended then is lost.
DRAIN_S = 120.0
RESULT_TIMEOUT_S = 30.0
LLM_TOKENS = 24


@dataclass(frozen=True)
class Profile:
    """A named set of fast-path switches (:data:`FAST_PATHS`), each on or off."""

    name: str
    switches: Mapping[str, bool]

    def env(self) -> dict[str, str]:
        """The workers' environment for these switches."""
        return {FAST_PATHS[name][0]: FAST_PATHS[name][1 if on else 2] for name, on in self.switches.items()}


PROFILES: dict[str, Profile] = {
    "baseline": Profile("baseline", dict.fromkeys(FAST_PATHS, False)),
    "tuned": Profile("tuned", dict.fromkeys(FAST_PATHS, True)),
}

#: The table the system was designed against: metric, where it was (then), the target.
TARGETS: tuple[tuple[str, str, str, str], ...] = (
    ("requests/s", "requests_per_s", "5", "10"),
    ("P99", "p99_s", "8 s", "3 s"),
    ("cache hit", "cache_hit_rate", "70%", "85%"),
    ("memory peak", "memory_peak_gb", "4.7 GB", "4.0 GB"),
    ("CPU", "cpu_percent", "65%", "50%"),
    ("uptime", "availability", "99.9%", "99.99%"),
)

#: The request mix: (role, task, weight).
MIX: tuple[tuple[str, str, int], ...] = (
    ("curation", "search", 20),
    ("curation", "embed", 15),
    ("curation", "classify", 15),
    ("grok", "synthesize", 12),
    ("grok", "analyze", 8),
    ("cline", "generate_code", 10),
    ("cline", "generate_docs", 10),
    ("curation", "index", 10),
)

_TOPICS = (
    "retry a failed HTTP request with exponential backoff",
    "parse a CSV file into a list of dictionaries",
    "cache the results of an expensive function",
    "sign a message with an Ed25519 key",
    "rotate log files by size",
    "merge two sorted lists",
    "count the words in a text file",
    "validate an email address",
    "schedule a job every minute",
    "measure the latency of a web service",
    "compress a directory into a tar archive",
    "deduplicate records by key",
    "stream a large JSON file",
    "limit the rate of API calls",
    "find the shortest path in a graph",
    "convert a timestamp between time zones",
)
_PARAPHRASES = ("How do I {t}?", "Explain how to {t}.", "What is the best way to {t}?", "Show me how to {t}.")
_LABELS = ["networking", "security", "data processing", "scheduling", "storage"]
#: Shares of the prompt pattern: the hot few asked again and again, paraphrases of them, prompts asked once.
HOT, PARAPHRASED = 0.3, 0.2


class Workload:
    """One agent's requests: kinds from :data:`MIX`, prompts with a skewed repeat pattern, all from a seed."""

    def __init__(self, seed: int, agent: int) -> None:
        self.rng = random.Random(seed * 100_003 + agent)
        self.agent = agent
        self.count = 0

    def prompt(self) -> str:
        """A hot prompt (Zipf-like: the first topics most), a paraphrase of one, or one asked once."""
        self.count += 1
        roll = self.rng.random()
        weights = [1 / (rank + 1) for rank in range(len(_TOPICS))]
        topic = self.rng.choices(_TOPICS, weights=weights)[0]
        if roll < HOT:
            return f"How do I {topic}?"
        if roll < HOT + PARAPHRASED:
            return self.rng.choice(_PARAPHRASES).format(t=topic)
        return f"How do I {topic} (case {self.agent}-{self.count}-{self.rng.randrange(10**6)})?"

    def next_request(self) -> tuple[str, str, dict[str, Any]]:
        role, task, _ = self.rng.choices(MIX, weights=[w for *_, w in MIX])[0]
        return role, task, self._kwargs(task, self.prompt())

    def _kwargs(self, task: str, prompt: str) -> dict[str, Any]:
        builders: dict[str, Callable[[], dict[str, Any]]] = {
            "search": lambda: {"query": prompt, "k": 3},
            "embed": lambda: {"texts": [prompt, f"{prompt} Answer briefly."]},
            "classify": lambda: {"text": prompt, "labels": _LABELS},
            "synthesize": lambda: {"prompt": prompt, "max_tokens": LLM_TOKENS, "temperature": 0.0, "seed": 1},
            "analyze": lambda: {"question": prompt, "options": ["a library", "a script"], "max_tokens": 16},
            "generate_code": lambda: {"spec": prompt, "max_tokens": LLM_TOKENS, "seed": 1},
            "generate_docs": lambda: {"topic": prompt, "max_tokens": LLM_TOKENS, "seed": 1},
            "index": lambda: {"documents": [{"id": f"load-{self.rng.randrange(50)}", "text": _document(prompt)}]},
        }
        return builders[task]()


def _document(prompt: str) -> str:
    return f"{prompt} " + " ".join(
        f"Step {i}: do the next part of it carefully and check the result." for i in range(8)
    )


# ---------------------------------------------------------------- the stack and its sampler


@dataclass
class Samples:
    """The stack sampled every :data:`SAMPLE_EVERY_S`: (seconds since the start, value) series."""

    pss_mb: list[tuple[float, float]] = field(default_factory=list)
    cpu_percent: list[tuple[float, float]] = field(default_factory=list)
    queue_depth: list[tuple[float, float]] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_s: float = 0.0


class Sampler(threading.Thread):
    """Samples the PSS and CPU time of every process of the stack, and the role queues' depth."""

    def __init__(self, roots: list[int], depth: Callable[[], int]) -> None:
        super().__init__(name="xnai-load-sampler", daemon=True)
        self.roots = roots
        self.depth = depth
        self.samples = Samples()
        self.stopping = threading.Event()
        self._cpu: dict[int, float] = {}
        self._procs: dict[int, psutil.Process] = {}

    def _processes(self) -> list[psutil.Process]:
        """Each root and its descendants, each process once (a root may be another root's child)."""
        found: dict[int, psutil.Process] = {}
        for pid in self.roots:
            try:
                root = self._procs.setdefault(pid, psutil.Process(pid))
                found.update((proc.pid, proc) for proc in [root, *root.children(recursive=True)])
            except psutil.Error:
                continue
        return list(found.values())

    def sample(self) -> tuple[float, float]:
        """(sum of PSS in MB, CPU seconds used so far by every process seen)."""
        pss = 0
        for proc in self._processes():
            try:
                pss += int(proc.memory_full_info().pss)
                times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
            except psutil.Error:
                continue  # it exited between the listing and the reading: its last CPU time is kept
        return pss / 1e6, sum(self._cpu.values())

    def run(self) -> None:
        start = time.monotonic()
        _, cpu_start = self.sample()
        last_t, last_cpu = start, cpu_start
        host = psutil.cpu_count() or 1
        while not self.stopping.wait(SAMPLE_EVERY_S):
            pss_mb, cpu = self.sample()
            now = time.monotonic()
            t = round(now - start, 2)
            self.samples.pss_mb.append((t, round(pss_mb, 1)))
            self.samples.cpu_percent.append((t, round(100 * (cpu - last_cpu) / ((now - last_t) * host), 1)))
            with contextlib.suppress(Exception):  # Redis busy or gone at the very end: a gap in the series
                self.samples.queue_depth.append((t, float(self.depth())))
            last_t, last_cpu = now, cpu
        self.samples.cpu_seconds = last_cpu - cpu_start
        self.samples.wall_s = last_t - start


@contextmanager
def load_stack(settings: Settings, profile: Profile) -> Iterator[tuple[Settings, Client, list[int]]]:
    """A private stack (Redis, guard, the four role workers with their models), a client, and its root pids."""
    from xnai_tasks.core.celery_app import create_app

    with model_stack(settings) as (bench, stack):
        control = create_app(bench, main="xnai_bench_load")
        client = Client(Settings.from_env({**bench.to_env(), **profile.env()}))  # the client's switches too
        procs = []
        try:
            for role in c.ROLES:
                procs.append(start_worker(bench, role, env=profile.env()))
            for role, proc in zip(c.ROLES, procs, strict=True):
                wait_online(proc, control, role)
            yield bench, client, [*_stack_pids(stack), *(p.pid for p in procs)]
        finally:
            for proc in procs:
                stop_worker(proc)
            client.close()
            control.close()


#: What a process of a running stack has in its command line (``--running``: the stack was started elsewhere).
STACK_MARKERS = ("xnai", "celery", "redis-server")


@contextmanager
def running_stack(settings: Settings) -> Iterator[tuple[Settings, Client, list[int]]]:
    """The stack ``settings`` point at, already running (on this host or on several), and a client.

    Its processes are every process of this machine whose command line names xnai, Celery or Redis (network
    namespaces standing for hosts share the machine's process table); the bench's own is left out.
    """
    from xnai_tasks.core import broker

    broker.require_reachable(settings)
    own = os.getpid()
    roots = [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if proc.pid != own and any(m in " ".join(proc.info["cmdline"] or ()) for m in STACK_MARKERS)
    ]
    client = Client(settings)
    try:
        yield settings, client, roots
    finally:
        client.close()


def _stack_pids(stack: Stack) -> list[int]:
    pids = [proc.pid for proc in stack.children.values()]
    process = getattr(stack.redis, "process", None)
    if process is not None:
        pids.append(process.pid)
    return pids


# ---------------------------------------------------------------- the agents


@dataclass
class Outcome:
    """One request: its kind, id, when it was submitted (s since the start), latency and how it ended."""

    kind: str
    task_id: str | None
    submitted_s: float
    latency_s: float | None = None
    ended: str | None = None  # "ok", "error", "refused"; None: not ended (lost)
    degraded: bool = False  # a verified result marked degraded (grok answering without its LLM)
    cached: bool = False  # a result answered by the response cache (its ``cache`` field)


@dataclass
class Agent:
    workload: Workload
    next_at: float = 0.0
    handle: TaskHandle | None = None
    outcome: Outcome | None = None
    started: float = 0.0

    def think(self) -> float:
        """Think time: uniform 0-1 s, from the agent's own seeded generator."""
        return self.workload.rng.random()


def _warm_up(client: Client) -> None:
    """One request of every kind (not measured), and a few documents in the bank for search to find."""
    warm = Workload(seed=-1, agent=0)
    for role, task, _ in MIX:
        client.submit(role, task, **warm._kwargs(task, "How do I warm up the stack?")).get(timeout=300)


def run_agents(client: Client, users: int, duration: float, seed: int, progress: Any) -> list[Outcome]:
    """The closed loop of ``users`` agents for ``duration`` seconds, then the drain; every request's outcome."""
    agents = [Agent(Workload(seed, i)) for i in range(users)]
    outcomes: list[Outcome] = []
    start = time.monotonic()
    end = start + duration
    shown = 0.0
    while True:
        now = time.monotonic()
        busy = 0
        for agent in agents:
            if agent.handle is not None:
                if agent.handle.state in states.READY_STATES:
                    _finish(agent, agent.think(), time.monotonic())
                else:
                    busy += 1
            if agent.handle is None and now < end and now >= agent.next_at:
                _submit(client, agent, now, start, outcomes)
                busy += agent.handle is not None
        if now - shown >= PROGRESS_EVERY_S:
            shown = now
            progress.n = round(min(now, end) - start, 1)
            progress.set_postfix(done=sum(o.ended is not None for o in outcomes), in_flight=busy, refresh=False)
            progress.refresh()
        if (now >= end and busy == 0) or now >= end + DRAIN_S:
            return outcomes
        time.sleep(POLL_EVERY_S)


def _submit(client: Client, agent: Agent, now: float, start: float, outcomes: list[Outcome]) -> None:
    role, task, kwargs = agent.workload.next_request()
    outcome = Outcome(kind=c.task_name(role, task), task_id=None, submitted_s=round(now - start, 3))
    outcomes.append(outcome)
    agent.started = time.monotonic()
    try:
        agent.handle = client.submit(role, task, **kwargs)
    except XnaiError:
        outcome.ended, outcome.latency_s = "error", time.monotonic() - agent.started
        agent.next_at = now + agent.think()
        return
    outcome.task_id = agent.handle.id
    agent.outcome = outcome


def _finish(agent: Agent, think: float, now: float) -> None:
    assert agent.handle is not None and agent.outcome is not None
    try:
        value = agent.handle.get(timeout=RESULT_TIMEOUT_S)  # verifies the worker's signature
        agent.outcome.ended = "ok"
        agent.outcome.degraded = isinstance(value, dict) and bool(value.get("degraded"))
        agent.outcome.cached = isinstance(value, dict) and isinstance(value.get("cache"), dict)
    except RefusedError:
        agent.outcome.ended = "refused"
    except XnaiError:
        agent.outcome.ended = "error"
    done = time.monotonic()
    agent.outcome.latency_s = done - agent.started
    agent.handle, agent.outcome = None, None
    agent.next_at = done + think


# ---------------------------------------------------------------- figures


def _kind_figures(outcomes: list[Outcome], waits: Mapping[str, float], window_s: float) -> dict[str, Any]:
    ended = [o for o in outcomes if o.ended is not None]
    ok = [o for o in outcomes if o.ended == "ok"]
    latencies = [o.latency_s for o in ok if o.latency_s is not None]
    queue_waits = [waits[o.task_id] for o in outcomes if o.task_id is not None and o.task_id in waits]
    submitted = len(outcomes)

    def pct(values: list[float], p: float) -> float | None:
        value = percentile(values, p)
        return None if value is None else round(value, 3)

    return {
        "submitted": submitted,
        "ended": len(ended),
        "completed": len(ok),
        "errors": sum(o.ended == "error" for o in outcomes),
        "refusals": sum(o.ended == "refused" for o in outcomes),
        "degraded": sum(o.degraded for o in outcomes),
        "lost": submitted - len(ended),
        "availability": round(len(ok) / submitted, 5) if submitted else None,
        "requests_per_s": round(len(ok) / window_s, 3) if window_s > 0 else 0.0,
        "p50_s": pct(latencies, 50),
        "p95_s": pct(latencies, 95),
        "p99_s": pct(latencies, 99),
        "queue_wait_p50_s": pct(queue_waits, 50),
        "queue_wait_p99_s": pct(queue_waits, 99),
        "cache_hit_rate": round(sum(o.cached for o in ok) / len(ok), 4) if ok else None,
    }


def run_profile(settings: Settings, profile: Profile, options: LoadOptions) -> dict[str, Any]:
    """One profile: start its stack, warm it up, run the agents while sampling, then the figures."""
    from tqdm import tqdm

    from xnai_tasks.core import broker
    from xnai_tasks.security.acl import ADMIN
    from xnai_tasks.security.redis_urls import connection_url

    stack = running_stack(settings) if options.running else load_stack(settings, profile)
    with stack as (bench, client, roots):
        _warm_up(client)
        bench.telemetry_dir.mkdir(parents=True, exist_ok=True)
        conn = broker.connect(connection_url(bench, ADMIN))
        sampler = Sampler(roots, lambda: sum(broker.queue_depth(conn, c.queue_for(r)) for r in c.ROLES))
        sampler.start()
        bar = tqdm(total=options.duration, desc=f"bench load ({profile.name})", unit="s", leave=False)
        try:
            start = time.monotonic()
            outcomes = run_agents(client, options.users, options.duration, options.seed, bar)
            window_s = time.monotonic() - start
        finally:
            bar.close()
            sampler.stopping.set()
            sampler.join()
        time.sleep(1.0)  # the last telemetry lines are written after the results are stored
        waits = {r.task_id: r.queue_wait_s for r in read_records(bench.telemetry_dir) if r.queue_wait_s is not None}
        samples = sampler.samples
        conn.close()
    kinds: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        kinds.setdefault(outcome.kind, []).append(outcome)
    figures = {kind: _kind_figures(group, waits, window_s) for kind, group in sorted(kinds.items())}
    overall = _kind_figures(outcomes, waits, window_s)
    host = psutil.cpu_count() or 1
    result: dict[str, Any] = {
        "switches": dict(profile.switches),
        "window_s": round(window_s, 2),
        **overall,
        "memory_peak_mb": round(max((v for _, v in samples.pss_mb), default=0.0), 1),
        "cpu_percent": round(100 * samples.cpu_seconds / (samples.wall_s * host), 1) if samples.wall_s else None,
        "kinds": figures,
    }
    if options.plot_dir is not None:
        result["plots"] = _plot(Path(options.plot_dir) / profile.name, outcomes, samples)
    return result


def _plot(out_dir: Path, outcomes: list[Outcome], samples: Samples) -> list[str]:
    from xnai_tasks.observability import plots

    latencies: dict[str, list[float]] = {}
    for o in sorted(outcomes, key=lambda o: o.kind):
        if o.ended == "ok" and o.latency_s is not None:
            latencies.setdefault(o.kind, []).append(o.latency_s)
    finished = [o.submitted_s + o.latency_s for o in outcomes if o.ended == "ok" and o.latency_s is not None]
    made = [
        plots.latency_cdf(latencies, out_dir / "latency_cdf.png", title="latency CDF (submit to verified result)"),
        plots.throughput(finished, out_dir / "throughput.png"),
        plots.series(samples.queue_depth, out_dir / "queue_depth.png", title="queue depth", ylabel="messages"),
        plots.series(samples.pss_mb, out_dir / "memory.png", title="stack memory (PSS)", ylabel="MB"),
        plots.series(samples.cpu_percent, out_dir / "cpu.png", title="stack CPU", ylabel="% of host"),
    ]
    return [str(path) for path in made]


def _ratio(tuned: float | None, baseline: float | None) -> float | None:
    return round(tuned / baseline, 3) if tuned is not None and baseline else None


def _cell(key: str, figures: Mapping[str, Any] | None) -> str:
    if figures is None:
        return "-"
    if key == "memory_peak_gb":
        value: Any = figures["memory_peak_mb"] / 1000
        return f"{value:.2f} GB"
    value = figures.get(key)
    if value is None:
        return "n/a"
    if key in ("cache_hit_rate", "availability"):
        return f"{100 * value:.2f}%"
    if key == "cpu_percent":
        return f"{value:.0f}%"
    if key == "p99_s":
        return f"{value:.2f} s"
    return f"{value:.2f}"


def format_table(profiles: Mapping[str, Mapping[str, Any]]) -> str:
    """The designed-against table: metric | then | target | one column per profile that ran (``-``: baseline or
    tuned did not run)."""
    names = list(profiles) if "running" in profiles else ["baseline", "tuned"]
    rows = [("metric", "then", "target", *names)]
    for title, key, then, target in TARGETS:
        rows.append((title, then, target, *(_cell(key, profiles.get(name)) for name in names)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def run_load(settings: Settings, _: BenchOptions, options: LoadOptions | None = None) -> dict[str, Any]:
    """``xnai bench load``: each profile asked for on its own private stack, same seed; ratios when both ran."""
    options = options or LoadOptions()
    if options.profile not in (*PROFILES, "both"):
        raise UsageError(f"unknown profile {options.profile!r} (profiles: {', '.join(PROFILES)}, both)")
    chosen = [PROFILES[name] for name in (PROFILES if options.profile == "both" else [options.profile])]
    if options.running:  # the running stack's switches are its own: one run, named after it
        chosen = [Profile("running", {})]
    profiles = {profile.name: run_profile(settings, profile, options) for profile in chosen}
    ratios: dict[str, float | None] = {}
    if len(profiles) == 2:
        base, tuned = profiles["baseline"], profiles["tuned"]
        ratios = {
            "tuned_vs_baseline_rps": _ratio(tuned["requests_per_s"], base["requests_per_s"]),
            "tuned_vs_baseline_p99": _ratio(tuned["p99_s"], base["p99_s"]),
        }
    return {
        "benchmark": "load",
        "host": host_facts(),
        "options": {
            "users": options.users,
            "duration_s": options.duration,
            "seed": options.seed,
            "profile": "running" if options.running else options.profile,
            "think_s": [0.0, 1.0],
            "llm_max_tokens": LLM_TOKENS,
            "mix": {c.task_name(role, task): weight for role, task, weight in MIX},
            "fast_paths": list(FAST_PATHS),
        },
        "percentiles": "nearest-rank",
        "profiles": profiles,
        "ratios": ratios,
        "table": format_table(profiles),
    }
