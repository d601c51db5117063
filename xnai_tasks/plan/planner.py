"""The resource plan: how many processes and threads each role runs, on which CPUs, with how much RAM.

Pure logic: :func:`make_plan` turns a :class:`Host` and the number of reserved cores into a :class:`Plan`.
Only :func:`detect_host` looks at the machine. The README's "The plan" section describes the rules; in short:

* the first ``reserved_cores`` cores are kept for the system (on 8 cores: cores 0-1);
* the remaining CPUs are split among grok (long-form LLM, the most), cline (LLM) and curation (encoder),
  each role at least one CPU; the light copilot (1 process x 1 thread: orchestration and encoder
  look-ups) shares the whole worker CPU set with them;
* a role never runs more ``processes x threads_per_process`` than it has CPUs;
* small hosts degrade instead of failing: with fewer worker CPUs than roles, every role runs 1 process x
  1 thread on the shared worker CPUs; with no worker CPU left at all (e.g. 2 cores, 2 reserved), every
  role shares *all* CPUs, the reserved ones included, since there is nothing else to run on;
* models are preloaded (one shared copy per role) when the RAM share fits them, otherwise loaded lazily
  (loaded on first use, unloaded when idle, refused when RAM is short), with fewer processes.

CPUs are logical CPU ids from the process's affinity mask. On SMT hosts a reserved core counts for as
many logical CPUs as there are threads per core (``logical / physical``); the first ones in the mask
are taken, which matches a core and its sibling only when the kernel numbers siblings next to each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from xnai_tasks.core import constants as c
from xnai_tasks.errors import SettingsError

if TYPE_CHECKING:
    pass

ModelMode = Literal["preload", "lazy", "none"]
MODEL_MODES: tuple[ModelMode, ...] = ("preload", "lazy", "none")

MiB = 1024 * 1024
GiB = 1024 * MiB

#: Default LLM footprint: Gemma 3 270M Q4_K_M (253 MB file) with its context and repacked weights.
DEFAULT_LLM_BYTES = 420 * MiB
#: Default encoder footprint: all-MiniLM-L6-v2 (90 MB of float32 weights) with the torch runtime buffers.
DEFAULT_ENCODER_BYTES = 120 * MiB
#: Private memory of one worker process besides the models (interpreter, libraries, KV cache, batches).
PROCESS_OVERHEAD_BYTES = 150 * MiB
#: RAM kept for the system: the larger of 1 GiB and one eighth of the RAM.
MIN_SYSTEM_RAM_BYTES = 1 * GiB

#: Which models each role holds (README, Models).
ROLE_MODELS: Mapping[str, tuple[str, ...]] = {
    "copilot": ("encoder",),
    "cline": ("gguf",),
    "grok": ("gguf", "encoder"),
    "curation": ("encoder",),
}
#: The roles that get CPUs of their own, in the order their CPU slices are laid out, and their weights.
CPU_WEIGHTS: Mapping[str, int] = {"cline": 2, "grok": 3, "curation": 1}
#: Most threads one process of a role uses; more processes are preferred beyond it.
MAX_THREADS: Mapping[str, int] = {"copilot": 1, "cline": 2, "grok": 4, "curation": 2}
#: Weights of the surplus RAM once every role's needs are covered.
RAM_WEIGHTS: Mapping[str, int] = {"copilot": 1, "cline": 3, "grok": 4, "curation": 2}


class RoleOverride(TypedDict, total=False):
    """What settings may force for one role; anything left out is computed."""

    processes: int
    threads_per_process: int
    cpus: list[int]
    model_mode: ModelMode
    ram_share_bytes: int


@dataclass(frozen=True)
class Host:
    """What the plan is computed for: physical cores, the CPUs this process may use, and total RAM."""

    physical_cores: int
    logical_cpus: list[int]
    ram_bytes: int

    def __post_init__(self) -> None:
        if not self.logical_cpus:
            raise ValueError("a host needs at least one CPU")
        if self.physical_cores < 1 or self.ram_bytes < 1:
            raise ValueError("a host needs at least one core and some RAM")


@dataclass(frozen=True, kw_only=True)
class RolePlan:
    """One role's share: ``processes`` each running ``threads_per_process`` threads, pinned to ``cpus``."""

    role: str
    processes: int
    threads_per_process: int
    cpus: list[int]
    model_mode: ModelMode
    ram_share_bytes: int

    @property
    def threads(self) -> int:
        """Threads the role runs in all."""
        return self.processes * self.threads_per_process


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The whole plan: the host it was made for, the reserved CPUs and one :class:`RolePlan` per role."""

    host: Host
    reserved_cpus: list[int]
    roles: dict[str, RolePlan] = field(default_factory=dict)
    #: True when no CPU was left outside the reserve and the roles share all CPUs.
    shares_reserved: bool = False
    #: The embedded Redis' ``maxmemory`` (see :func:`redis_memory_cap`; XNAI_REDIS_MAXMEMORY_MB overrides).
    redis_maxmemory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def to_json(self) -> str:
        """The plan as JSON text (what ``xnai plan`` prints)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read back what :meth:`to_json` wrote."""
        data = json.loads(text)
        roles = {name: RolePlan(**raw) for name, raw in data["roles"].items()}
        return cls(
            host=Host(**data["host"]),
            reserved_cpus=list(data["reserved_cpus"]),
            roles=roles,
            shares_reserved=bool(data.get("shares_reserved", False)),
            redis_maxmemory_bytes=int(data.get("redis_maxmemory_bytes", 0)),
        )


def detect_host() -> Host:
    """This machine as this process sees it: physical cores, affinity mask and total RAM."""
    import psutil

    cpus = sorted(os.sched_getaffinity(0))
    physical = psutil.cpu_count(logical=False) or len(cpus)
    return Host(physical_cores=int(physical), logical_cpus=cpus, ram_bytes=int(psutil.virtual_memory().total))


def make_plan(
    host: Host,
    reserved_cores: int,
    overrides: Mapping[str, RoleOverride] | None = None,
    *,
    llm_bytes: int = DEFAULT_LLM_BYTES,
    encoder_bytes: int = DEFAULT_ENCODER_BYTES,
    redis_maxmemory_bytes: int | None = None,
) -> Plan:
    """Split the host among the roles; ``llm_bytes``/``encoder_bytes`` are the models' RAM footprints."""
    if reserved_cores < 0:
        raise SettingsError(f"XNAI_RESERVED_CORES={reserved_cores} must not be negative")
    reserved, workers = _split_reserved(host, reserved_cores)
    shares_reserved = not workers
    if shares_reserved:
        workers = list(host.logical_cpus)
    cpus = _role_cpus(workers)
    # Too few CPUs for a slice each: every role shares them all, so each runs 1 process x 1 thread.
    shared = len(workers) < len(CPU_WEIGHTS)
    shapes = {role: (1, 1) if shared else _shape(role, len(cpus[role])) for role in c.ROLES}
    overrides = overrides or {}
    _check_override_roles(overrides)
    for role, override in overrides.items():
        if "cpus" in override:
            cpus[role] = _checked_cpus(role, override["cpus"], host)
            shapes[role] = _shape(role, len(cpus[role]))
    model_bytes = {"gguf": llm_bytes, "encoder": encoder_bytes}
    n_cpus = {role: len(cpus[role]) for role in c.ROLES}
    modes, shares, shapes = _memory(host, n_cpus, shapes, overrides, model_bytes)
    roles: dict[str, RolePlan] = {}
    for role in c.ROLES:
        override = overrides.get(role, {})
        processes = override.get("processes", shapes[role][0])
        threads = override.get("threads_per_process", shapes[role][1])
        roles[role] = RolePlan(
            role=role,
            processes=processes,
            threads_per_process=threads,
            cpus=cpus[role],
            model_mode=override.get("model_mode", modes[role]),
            ram_share_bytes=override.get("ram_share_bytes", shares[role]),
        )
        _check_role(roles[role])
    return Plan(
        host=host,
        reserved_cpus=reserved,
        roles=roles,
        shares_reserved=shares_reserved,
        redis_maxmemory_bytes=redis_maxmemory_bytes or redis_memory_cap(host),
    )


def redis_memory_cap(host: Host) -> int:
    """Redis' share of the host: 5% of RAM, at least 256 MiB and at most 2 GiB.

    Results expire after a day and the guard (xnai_tasks.ops.memory_guard) keeps any one role below a quarter
    of it, so the cap bounds what a flood can take from the models, and what a role can take from the rest.
    """
    return int(min(2 * GiB, max(256 * MiB, host.ram_bytes * 0.05)))


def _split_reserved(host: Host, reserved_cores: int) -> tuple[list[int], list[int]]:
    """The reserved logical CPUs (first in the mask) and the rest."""
    cpus = list(host.logical_cpus)
    physical = max(1, min(host.physical_cores, len(cpus)))
    per_core = max(1, len(cpus) // physical)
    n_reserved = min(len(cpus), reserved_cores * per_core)
    return cpus[:n_reserved], cpus[n_reserved:]


def _role_cpus(workers: list[int]) -> dict[str, list[int]]:
    """CPU sets: weighted contiguous slices when there are enough CPUs, else everyone shares them all."""
    if len(workers) < len(CPU_WEIGHTS):
        return {role: list(workers) for role in c.ROLES}
    counts = _weighted_counts(len(workers), CPU_WEIGHTS)
    result: dict[str, list[int]] = {"copilot": list(workers)}
    start = 0
    for role, count in counts.items():
        result[role] = workers[start : start + count]
        start += count
    return result


def _weighted_counts(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` into at least 1 per key, the rest by weight (largest remainder, ties by weight)."""
    counts = dict.fromkeys(weights, 1)
    spare = total - len(weights)
    weight_sum = sum(weights.values())
    exact = {key: spare * w / weight_sum for key, w in weights.items()}
    for key in weights:
        counts[key] += int(exact[key])
    left = total - sum(counts.values())
    order = sorted(weights, key=lambda k: (exact[k] - int(exact[k]), weights[k]), reverse=True)
    for key in order[:left]:
        counts[key] += 1
    return counts


def _shape(role: str, n_cpus: int, max_processes: int | None = None) -> tuple[int, int]:
    """(processes, threads) using the most of ``n_cpus``; among equal uses, the most processes.

    Processes before threads: ``xnai bench threads`` measured 2 processes x 1 thread at 1.67x the LLM
    tokens/s of 1 x 1 and 2.95x its embeddings/s, against 1.11x and 2.34x for 1 process x 2 threads
    (README, The plan). ``MAX_THREADS`` still bounds the threads of one process when set by hand.
    """
    if role == "copilot":
        return 1, 1
    best = (1, 1)
    for threads in range(1, max(1, min(MAX_THREADS[role], n_cpus)) + 1):
        processes = max(1, n_cpus // threads)
        if max_processes is not None:
            processes = max(1, min(processes, max_processes))
        if processes * threads > best[0] * best[1]:
            best = (processes, threads)
    return best


def _memory(
    host: Host,
    n_cpus: Mapping[str, int],
    shapes: dict[str, tuple[int, int]],
    overrides: Mapping[str, RoleOverride],
    model_bytes: Mapping[str, int],
) -> tuple[dict[str, ModelMode], dict[str, int], dict[str, tuple[int, int]]]:
    """Model mode and RAM share per role; lazy roles get fewer processes when their share is tight."""
    usable = max(0, host.ram_bytes - max(MIN_SYSTEM_RAM_BYTES, host.ram_bytes // 8))
    models = {
        role: 0
        if overrides.get(role, {}).get("model_mode") == "none"
        else sum(model_bytes[m] for m in ROLE_MODELS[role])
        for role in c.ROLES
    }
    need = {role: models[role] + shapes[role][0] * PROCESS_OVERHEAD_BYTES for role in c.ROLES}
    modes: dict[str, ModelMode] = {role: "none" if models[role] == 0 else "lazy" for role in c.ROLES}
    remaining = usable
    for role in sorted(c.ROLES, key=lambda r: need[r]):
        if modes[role] != "none" and need[role] <= remaining:
            modes[role] = "preload"
            remaining -= need[role]
    shares = {role: need[role] for role in c.ROLES if modes[role] != "lazy"}
    lazy = [role for role in c.ROLES if modes[role] == "lazy"]
    if lazy:
        lazy_need = sum(need[r] for r in lazy)
        for role in lazy:
            shares[role] = remaining * need[role] // lazy_need
            per_process = models[role] + PROCESS_OVERHEAD_BYTES
            max_processes = max(1, shares[role] // per_process)
            if max_processes < shapes[role][0]:
                shapes[role] = _shape(role, n_cpus[role], max_processes=max_processes)
    else:
        weight_sum = sum(RAM_WEIGHTS.values())
        for role in c.ROLES:
            shares[role] += remaining * RAM_WEIGHTS[role] // weight_sum
    return modes, shares, shapes


def _check_override_roles(overrides: Mapping[str, RoleOverride]) -> None:
    for role, override in overrides.items():
        if role not in c.ROLES:
            raise SettingsError(f"plan override names an unknown role {role!r}")
        mode = override.get("model_mode")
        if mode is not None and mode not in MODEL_MODES:
            raise SettingsError(f"plan override {role}.model_mode={mode!r} must be one of {MODEL_MODES}")


def _checked_cpus(role: str, cpus: list[int], host: Host) -> list[int]:
    unknown = sorted(set(cpus) - set(host.logical_cpus))
    if unknown:
        raise SettingsError(f"plan override {role}.cpus names CPUs this process cannot use: {unknown}")
    return sorted(set(cpus))


def _check_role(plan: RolePlan) -> None:
    """Every role: at least 1 process, 1 thread, 1 CPU, and never more threads than CPUs."""
    if plan.processes < 1 or plan.threads_per_process < 1 or not plan.cpus:
        raise SettingsError(f"plan for {plan.role} needs at least 1 process, 1 thread and 1 CPU")
    if plan.threads > len(plan.cpus):
        raise SettingsError(
            f"plan for {plan.role}: {plan.processes} processes x {plan.threads_per_process} threads "
            f"oversubscribe its {len(plan.cpus)} CPUs"
        )
    if plan.ram_share_bytes < 0:
        raise SettingsError(f"plan for {plan.role}: ram_share_bytes must not be negative")


def role_models(role: str) -> tuple[str, ...]:
    """The model kinds (``"gguf"`` (the LLM), ``"encoder"``) a role holds."""
    return ROLE_MODELS[role]


def for_concurrency(role_plan: RolePlan, concurrency: int | None, threads: int | None = None) -> RolePlan:
    """The role's plan as one worker runs it: ``concurrency`` pool processes (None: the plan's).

    Threads per process: ``threads`` when given (XNAI_THREADS; may oversubscribe the CPU set, the caller
    warns), the plan's when the concurrency is the plan's, else the CPU set divided by the concurrency.
    """
    processes = concurrency or role_plan.processes
    if threads is None:
        if processes == role_plan.processes:
            threads = role_plan.threads_per_process
        else:
            threads = max(1, min(MAX_THREADS[role_plan.role], len(role_plan.cpus) // processes))
    return replace(role_plan, processes=processes, threads_per_process=threads)


def format_plan(plan: Plan) -> str:
    """``xnai plan`` for people: the host, the reserve and one line per role."""
    host = plan.host
    reserved = _cpu_list(plan.reserved_cpus) or "-"
    lines = [
        f"host: {host.physical_cores} physical cores, CPUs {_cpu_list(host.logical_cpus)}, "
        f"{host.ram_bytes / GiB:.1f} GiB RAM",
        f"reserved for the system: CPUs {reserved}"
        + (" (no CPU left beside them: the roles share all CPUs)" if plan.shares_reserved else ""),
        f"{'role':10}{'processes':>10}{'threads':>9}  {'cpus':12}{'models':>9}  ram share",
    ]
    for role in plan.roles.values():
        lines.append(
            f"{role.role:10}{role.processes:>10}{role.threads_per_process:>9}  {_cpu_list(role.cpus):12}"
            f"{role.model_mode:>9}  {role.ram_share_bytes / MiB:.0f} MiB"
        )
    lines.append(f"redis: maxmemory {plan.redis_maxmemory_bytes / MiB:.0f} MiB")
    return "\n".join(lines)


def _cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] + 1 == cpu:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
