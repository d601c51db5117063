"""A test harness that builds hosts as Linux network namespaces on this machine (see ``hosts.cluster``).

::

    with Cluster(env={"XNAI_DEAD_AFTER": "5"}) as cluster:     # NamespacesUnavailable(reason): pytest.skip it
        hub = cluster.add_hub()                                 # redis + TLS terminator + copilot, 10.231.0.1
        a = cluster.add_host("a", ("cline", "curation"))        # 10.231.0.11, joined with a bundle, rediss://
        cluster.start()                                         # hub, then every host at once; all nodes answer
        batch = hub.submit_many([("curation", "where", {"value": i}) for i in range(300)])
        batch.wait_for(50)
        a.kill_all()                                            # or a.cut_link() ... a.restore_link()
        outcomes = batch.wait()                                 # Outcome.ok, .value, .error, .node, .host
"""

from hosts.cluster import Batch, Call, Cluster, HarnessError, Host, Hub, NamespacesUnavailable, Node, Outcome, Proc
from hosts.netns import NetnsError, list_namespaces, sweep_stale, unavailable_reason

__all__ = [
    "Batch",
    "Call",
    "Cluster",
    "HarnessError",
    "Host",
    "Hub",
    "NamespacesUnavailable",
    "NetnsError",
    "Node",
    "Outcome",
    "Proc",
    "list_namespaces",
    "sweep_stale",
    "unavailable_reason",
]
