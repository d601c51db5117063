"""Several hosts on one machine, each a Linux network namespace (tests/hosts): a hub with the embedded Redis and the
copilot, host ``a`` (cline, curation) and host ``b`` (grok, curation) reaching it over TCP through a bridge.

Tasks are submitted by a client in the hub's namespace; ``ROLE.where`` (tests/hosts/node_tasks.py, no model) says
which node ran it. Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosts import (
    Call,
    Cluster,
    HarnessError,
    NamespacesUnavailable,
    list_namespaces,
    netns,
    sweep_stale,
    unavailable_reason,
)
from hosts.cluster import BASE_DIR


def _cluster_or_skip() -> Cluster:
    try:
        return Cluster()
    except NamespacesUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """hub (redis, copilot), a (cline, curation), b (grok, curation); torn down even when a test fails."""
    made = _cluster_or_skip()
    try:
        made.add_hub(roles=("copilot",))
        made.add_host("a", ("cline", "curation"))
        made.add_host("b", ("grok", "curation"))
        made.start()
        yield made
    finally:
        made.teardown()
    assert made.namespaces() == []


def _root_has_test_network(subnet: str) -> list[str]:
    shown = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    return [line for line in (shown + routes).splitlines() if f"{subnet}." in line]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: this machine's init may never reap an orphan)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# ---- without namespaces: the reasons to skip ----


def test_not_root_is_a_reason_to_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a process that is not root
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    # When asked whether namespaces can be made
    reason = unavailable_reason()
    # Then the one-line reason says so
    assert reason == "not root: making network namespaces needs CAP_SYS_ADMIN (run the tests as root)"


def test_missing_ip_command_is_a_reason_to_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given root with no `ip` on PATH
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "ip" else f"/usr/bin/{tool}")
    # When asked, then the reason names the command
    assert unavailable_reason() == "no `ip` command on PATH (iproute2 / util-linux / hostname)"


def test_cluster_refuses_to_start_without_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given namespaces that cannot be made
    import hosts.cluster

    monkeypatch.setattr(hosts.cluster, "unavailable_reason", lambda: "not root: test")
    # When a cluster is made, then it is refused with the reason (the fixtures turn it into pytest.skip)
    with pytest.raises(NamespacesUnavailable, match=r"^not root: test$"):
        Cluster()


# ---- with namespaces ----


def test_a_new_cluster_sweeps_what_dead_runs_left_only() -> None:
    # Given a namespace and a folder named after a process that has ended (a run killed before its teardown), and a
    # namespace named after this live process
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale, live = f"xnai-{ended.pid}-0-x", f"xnai-{os.getpid()}-live-x"
    stale_folder = Path(BASE_DIR) / f"xnai-h{ended.pid}-test"
    made = None
    try:
        reason = unavailable_reason()
        if reason is not None:
            pytest.skip(f"network namespaces unavailable: {reason}")
        netns.ip("netns", "add", stale)
        netns.ip("netns", "add", live)
        stale_folder.mkdir()
        # When a cluster is made
        made = Cluster()
        # Then the dead run's namespace and folder are gone, and the live one's namespace is left alone
        names = list_namespaces()
        assert stale in made.swept and stale not in names and not stale_folder.exists()
        assert live in names and live not in made.swept
        assert sweep_stale() == []
    finally:
        if made is not None:
            made.teardown()
        netns.delete_namespace(stale)
        netns.delete_namespace(live)
        shutil.rmtree(stale_folder, ignore_errors=True)


@pytest.mark.slow
def test_tasks_from_the_hub_run_on_both_hosts(cluster: Cluster) -> None:
    # Given curation on both hosts, cline on a only, grok on b only
    hub = cluster.require_hub()
    calls: list[Call] = [("curation", "where", {"value": i, "delay_s": 0.3}) for i in range(16)]
    calls += [("cline", "where", {"value": "c"}), ("grok", "where", {"value": "g"})]
    calls += [(role, "health", {}) for role in ("cline", "grok", "curation")]
    # When the hub's client submits them all
    outcomes = hub.submit_many(calls, timeout=120).wait()
    # Then every one succeeded, each on a node of its role, and the shared role's tasks ran on both hosts
    assert [o.error for o in outcomes if not o.ok] == []
    assert all(o.node is not None and o.node.startswith(f"{o.role}@") for o in outcomes)
    by_node = Counter(o.node for o in outcomes if o.role == "curation")
    assert set(by_node) == {"curation@a", "curation@b"}, by_node
    assert {o.node for o in outcomes if o.role == "cline"} == {"cline@a"}
    assert {o.node for o in outcomes if o.role == "grok"} == {"grok@b"}
    # each host's processes have its own host name
    assert all(o.value["host"] == o.host for o in outcomes if o.task == "where")
    assert sorted(o.value["value"] for o in outcomes if o.role == "curation" and o.task == "where") == list(range(16))


@pytest.mark.slow
def test_every_worker_of_a_role_answers_the_same_broadcast(cluster: Cluster) -> None:
    # Given two curation workers, one per host, sharing the curation role's control-command ledger
    hub = cluster.require_hub()
    # When the hub pings every node with one broadcast (a nonce the two workers both see)
    ok, seen = hub.online(want=["curation@a", "curation@b"], timeout=30)
    # Then both answer: each node keeps its own record of the nonce, so neither takes the other's for a replay
    assert ok and {"curation@a", "curation@b", "cline@a", "grok@b", "copilot@hub"} <= set(seen)


@pytest.mark.slow
def test_the_root_namespace_has_no_address_or_route_on_the_test_network(cluster: Cluster) -> None:
    # Given a running cluster whose hosts reach the hub
    hub, a = cluster.require_hub(), cluster.hosts["a"]
    assert a.reaches(hub.address)
    # Then the machine itself has no address and no route on the test network: only the namespaces do
    assert _root_has_test_network(cluster.subnet) == []
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line for line in links if line.startswith(("v-", "br0", "eth0@"))] == []  # no end of the test's wiring


@pytest.mark.slow
def test_a_cut_link_isolates_its_host_until_restored(cluster: Cluster) -> None:
    hub, a, b = cluster.require_hub(), cluster.hosts["a"], cluster.hosts["b"]
    # Given host a's cable pulled
    a.cut_link()
    try:
        # Then a cannot reach the hub, b still can
        assert not a.link_up
        assert not a.reaches(hub.address)
        assert b.reaches(hub.address)
        batch = hub.submit_many([("cline", "where", {"value": 1}), ("grok", "where", {"value": 2})], timeout=120)
        # grok (on b) answers while a is cut off
        done = batch.wait_for(1)
        assert [(o.role, o.ok, o.node) for o in done] == [("grok", True, "grok@b")]
    finally:
        # When the cable is back
        a.restore_link()
    # Then a reaches the hub again, and the cline task (only a has cline) runs there
    assert a.link_up and a.reaches(hub.address)
    outcomes = batch.wait()
    assert [(o.role, o.ok, o.node) for o in outcomes] == [("cline", True, "cline@a"), ("grok", True, "grok@b")]


@pytest.mark.slow
def test_a_killed_host_leaves_no_process_and_starts_again(cluster: Cluster) -> None:
    hub, b = cluster.require_hub(), cluster.hosts["b"]
    # Given host b running its workers
    assert b.pids()
    # When every process of b is killed at once
    killed = b.kill_all()
    # Then none is left in its namespace, and the hub no longer hears from it
    assert killed and b.pids() == [] and b.running() == []
    hub.wait_gone(b.node_names)
    # When b starts again, then its workers answer and run tasks
    b.start()
    outcomes = hub.submit_many([("grok", "where", {"value": 3})], timeout=120).wait()
    assert [(o.ok, o.node) for o in outcomes] == [(True, "grok@b")]


@pytest.mark.slow
def test_a_stopped_host_leaves_no_process_and_starts_again(cluster: Cluster) -> None:
    hub, a = cluster.require_hub(), cluster.hosts["a"]
    # When host a is stopped (SIGTERM, then SIGKILL for what is left)
    a.stop()
    # Then nothing of it runs, and the hub no longer hears from it
    assert a.pids() == [] and a.running() == []
    hub.wait_gone(a.node_names)
    # When it starts again, then its roles run tasks there
    a.start()
    outcomes = hub.submit_many([("cline", "where", {}), ("curation", "health", {})], timeout=120).wait()
    assert all(o.ok for o in outcomes) and outcomes[0].node == "cline@a"


@pytest.mark.slow
def test_teardown_leaves_nothing_even_when_the_test_fails() -> None:
    # Given a small cluster (a hub with only Redis, one curation host) that ran a task, with a process on the host
    # that left the harness's process group (setsid), as a daemon would
    made = _cluster_or_skip()
    stray: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), made:
        made.add_hub(roles=())
        host = made.add_host("c", ("curation",))
        made.start()
        outcomes = made.require_hub().submit_many([("curation", "where", {"value": 1})], timeout=120).wait()
        assert [(o.ok, o.node) for o in outcomes] == [(True, "curation@c")]
        started = host.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 < /dev/null & echo $!"])
        stray.append(int(started.stdout.strip()))
        pids = [pid for node in made.nodes for pid in node.pids()]
        assert stray[0] in pids
        # When the test fails inside the cluster's `with`
        raise RuntimeError("the test failed")
    # Then no namespace, process, interface, address or file of the cluster is left
    assert [name for name in list_namespaces() if name.startswith(made.prefix)] == []
    assert [pid for pid in [*stray, *pids] if _running(pid)] == []
    assert _root_has_test_network(made.subnet) == []
    assert not made.base.exists()
    # and a second teardown is a no-op
    made.teardown()


@pytest.mark.slow
def test_a_host_name_that_cannot_be_an_interface_is_refused() -> None:
    made = _cluster_or_skip()
    with made:
        # When a host is named with characters or length an interface name cannot take, then it is refused
        with pytest.raises(HarnessError, match=r"^bad host name 'Host_1': lower-case letters and digits"):
            made.add_host("Host_1", ("curation",))
        with pytest.raises(HarnessError, match=r"^the cluster has no hub: call add_hub first$"):
            made.start()
