"""Same-node pod-to-pod traffic is spliced in the kernel (the counters rise) and arrives bit for bit."""

from __future__ import annotations

import pytest

from tests.e2e import cluster, traffic

pytestmark = pytest.mark.usefixtures("meshaccel")


def test_same_node_pod_to_pod_is_spliced_and_bit_exact() -> None:
    conns = 4
    before = cluster.agent_counters()
    ip = traffic.start_server("splice-server", 9000, conns)
    traffic.start_client("splice-client", ip, 9000, conns, msgs=24)
    try:
        moved = traffic.assert_bit_exact(traffic.finished("splice-client"), traffic.finished("splice-server"), conns)
    finally:
        traffic.delete("splice-client", "splice-server")
    after = cluster.agent_counters()
    rise = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # Both ends of each connection went into the sockhash, and sends were redirected peer to peer.
    assert rise["sockets_inserted"] >= 2 * conns, rise
    assert rise["redirect_verdicts"] >= conns, rise
    assert rise["verdict_bytes"] > 0 and moved > 0, rise
    assert rise.get("insert_errors", 0) == 0, rise
