"""`kubectl delete -k` plus the cleanup DaemonSet leave no attachment, pin or map on the host."""

from __future__ import annotations

import pytest

from tests.e2e import cluster, install
from tests.e2e.cluster import NODE, PIN_ROOT


@pytest.mark.usefixtures("meshaccel")
def test_uninstall_leaves_nothing_on_the_host() -> None:
    maps = cluster.pinned_map_ids()
    assert maps, f"nothing pinned under {PIN_ROOT / NODE} before the uninstall"
    assert cluster.root_attachments(), "nothing attached at the cgroup root before the uninstall"
    install.uninstall()
    assert not install.installed()
    assert not (PIN_ROOT / NODE).exists(), f"pins left: {list((PIN_ROOT / NODE).rglob('*'))}"
    assert cluster.root_attachments() == [], f"still attached at {cluster.cgroup2_root()}: {cluster.root_attachments()}"
    # The maps go once the last reference does (freed asynchronously by the kernel).
    cluster.poll(lambda: not (maps & cluster.map_ids()), 30, f"maps {sorted(maps)} to be freed")
    for ns in ("meshaccel-system", "meshaccel-cleanup"):
        assert cluster.kubectl("get", "namespace", ns, check=False).returncode != 0, f"namespace {ns} is left"


@pytest.mark.usefixtures("node")
def test_no_packet_from_the_pod_range_headed_off_the_machine() -> None:
    """The node's nft guard counts (and drops) anything from the pod range leaving by another interface
    than the node's own; after the whole suite it must have seen nothing. `node.py down` checks it again."""
    import json
    import subprocess

    p = subprocess.run(["nft", "-j", "list", "counters", "table", "inet", "mae2e_guard"], capture_output=True,
                       text=True, check=True)
    counters = {c["counter"]["name"]: c["counter"]["packets"] for c in json.loads(p.stdout)["nftables"]
                if "counter" in c}
    assert set(counters) == {"pod_to_uplink", "pod_elsewhere"}, counters
    assert counters == {"pod_to_uplink": 0, "pod_elsewhere": 0}, counters


@pytest.mark.usefixtures("node")
def test_kernel_settings_the_node_changed_are_known_for_restoring() -> None:
    """The kubelet (protectKernelDefaults: false) and the CNI bridge change kernel settings; the node
    recorded their values from before it started, and `node.py down` (the `node` fixture's teardown)
    writes them back and fails if one does not take."""
    import json
    from pathlib import Path

    before = json.loads(Path("/run/meshaccel-e2e/state.json").read_text())["sysctls"]
    now = {k: Path("/proc/sys", k).read_text().strip() for k in before}
    changed = {k: (before[k], now[k]) for k in before if before[k] != now[k]}
    # So the restore at the end is really exercised (e.g. kernel.panic, vm.overcommit_memory, ip_forward).
    assert changed, f"nothing recorded was changed: {now}"
