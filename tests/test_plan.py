"""The plan's invariants on hosts of 2 to 32 cores, and its rules on the reference 8-core host."""

from __future__ import annotations

import pytest

from xnai_tasks.core import constants as c
from xnai_tasks.errors import SettingsError
from xnai_tasks.plan.planner import GiB, Host, MiB, Plan, detect_host, make_plan

HOSTS = {
    2: Host(physical_cores=2, logical_cpus=[0, 1], ram_bytes=4 * GiB),
    4: Host(physical_cores=4, logical_cpus=list(range(4)), ram_bytes=8 * GiB),
    8: Host(physical_cores=8, logical_cpus=list(range(8)), ram_bytes=16 * GiB),
    16: Host(physical_cores=16, logical_cpus=list(range(16)), ram_bytes=32 * GiB),
    32: Host(physical_cores=32, logical_cpus=list(range(32)), ram_bytes=64 * GiB),
}


def check_invariants(plan: Plan) -> None:
    assert set(plan.roles) == set(c.ROLES)
    remaining = set(plan.host.logical_cpus) - set(plan.reserved_cpus)
    for role in plan.roles.values():
        assert role.processes >= 1 and role.threads_per_process >= 1 and role.cpus
        assert role.processes * role.threads_per_process <= len(role.cpus), role
        assert set(role.cpus) <= set(plan.host.logical_cpus)
        if remaining:
            assert not set(role.cpus) & set(plan.reserved_cpus), role
        assert role.ram_share_bytes >= 0
        assert role.model_mode in ("preload", "lazy", "none")


@pytest.mark.parametrize("cores", sorted(HOSTS))
@pytest.mark.parametrize("reserved", [0, 1, 2, 3, 40])
def test_invariants(cores: int, reserved: int) -> None:
    check_invariants(make_plan(HOSTS[cores], reserved))


@pytest.mark.parametrize("cores", sorted(HOSTS))
def test_worker_roles_do_not_overlap_when_there_is_room(cores: int) -> None:
    plan = make_plan(HOSTS[cores], 2)
    if cores - 2 < 3:
        return
    sets = [set(plan.roles[r].cpus) for r in c.WORKER_ROLES]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == cores - 2


def test_reference_host_8_cores_16_gb() -> None:
    plan = make_plan(HOSTS[8], 2)
    assert plan.reserved_cpus == [0, 1]
    assert not plan.shares_reserved
    roles = plan.roles
    assert (roles["copilot"].processes, roles["copilot"].threads_per_process) == (1, 1)
    assert roles["copilot"].cpus == [2, 3, 4, 5, 6, 7]
    assert roles["grok"].threads > roles["cline"].threads >= roles["curation"].threads
    assert len(roles["grok"].cpus) + len(roles["cline"].cpus) + len(roles["curation"].cpus) == 6
    assert all(r.model_mode == "preload" for r in roles.values())
    assert sum(r.ram_share_bytes for r in roles.values()) <= 16 * GiB


def test_two_cores_two_reserved_shares_all_cpus() -> None:
    plan = make_plan(HOSTS[2], 2)
    assert plan.shares_reserved
    assert plan.reserved_cpus == [0, 1]
    for role in plan.roles.values():
        assert (role.processes, role.threads_per_process, role.cpus) == (1, 1, [0, 1])


def test_four_cores_two_reserved_roles_share_the_rest() -> None:
    plan = make_plan(HOSTS[4], 2)
    assert not plan.shares_reserved
    for role in plan.roles.values():
        assert (role.processes, role.threads_per_process, role.cpus) == (1, 1, [2, 3])


def test_smt_reserves_whole_cores() -> None:
    host = Host(physical_cores=4, logical_cpus=list(range(8)), ram_bytes=16 * GiB)
    plan = make_plan(host, 1)
    assert plan.reserved_cpus == [0, 1]
    check_invariants(plan)


def test_affinity_mask_is_respected() -> None:
    host = Host(physical_cores=64, logical_cpus=[4, 5, 6, 7, 8, 9], ram_bytes=16 * GiB)
    plan = make_plan(host, 2)
    assert plan.reserved_cpus == [4, 5]
    check_invariants(plan)


def test_tight_ram_goes_lazy_with_fewer_processes() -> None:
    host = Host(physical_cores=16, logical_cpus=list(range(16)), ram_bytes=2 * GiB)
    plan = make_plan(host, 2)
    check_invariants(plan)
    assert plan.roles["grok"].model_mode == "lazy"
    assert plan.roles["grok"].processes == 1
    assert sum(r.ram_share_bytes for r in plan.roles.values()) <= 2 * GiB


def test_big_llm_on_16_gb() -> None:
    plan = make_plan(HOSTS[8], 2, llm_bytes=5632 * MiB)
    check_invariants(plan)
    assert plan.roles["grok"].ram_share_bytes >= 5632 * MiB
    plan = make_plan(HOSTS[8], 2, llm_bytes=8 * GiB)
    check_invariants(plan)
    assert "lazy" in {plan.roles["grok"].model_mode, plan.roles["cline"].model_mode}


def test_overrides() -> None:
    plan = make_plan(
        HOSTS[8],
        2,
        {
            "grok": {"processes": 3, "threads_per_process": 1},
            "curation": {"model_mode": "lazy", "cpus": [6, 7]},
        },
    )
    check_invariants(plan)
    assert (plan.roles["grok"].processes, plan.roles["grok"].threads_per_process) == (3, 1)
    assert plan.roles["curation"].cpus == [6, 7]
    assert plan.roles["curation"].model_mode == "lazy"


@pytest.mark.parametrize(
    "override",
    [
        {"nobody": {"processes": 1}},
        {"grok": {"processes": 4, "threads_per_process": 2}},
        {"grok": {"processes": 0}},
        {"grok": {"cpus": [99]}},
        {"grok": {"model_mode": "eager"}},
    ],
)
def test_bad_overrides_raise(override: dict[str, dict[str, object]]) -> None:
    with pytest.raises(SettingsError):
        make_plan(HOSTS[8], 2, override)  # type: ignore[arg-type]


def test_negative_reserve_raises() -> None:
    with pytest.raises(SettingsError):
        make_plan(HOSTS[8], -1)


def test_json_round_trip() -> None:
    plan = make_plan(HOSTS[16], 2)
    assert Plan.from_json(plan.to_json()) == plan


def test_detect_host() -> None:
    host = detect_host()
    assert host.physical_cores >= 1 and host.logical_cpus and host.ram_bytes > 0
    check_invariants(make_plan(host, 2))
