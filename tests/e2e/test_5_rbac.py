"""RBAC is least privilege, checked against the real authorizer: what each service account may do equals
the list the README documents; the CA refuses a token of any other account."""

from __future__ import annotations

import re

import pytest

from tests.e2e import cluster
from tests.e2e.cluster import NODE, SYSTEM_NS, TEST_NS, kubectl

pytestmark = pytest.mark.usefixtures("meshaccel")

Row = tuple[str, str, str, str]


def can_i_rows(text: str) -> set[Row]:
    """`kubectl auth can-i --list` as (resource, non-resource URLs, resource names, verbs) rows."""
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    header = lines[0]
    starts = [header.index(h) for h in ("Resources", "Non-Resource URLs", "Resource Names", "Verbs")]
    rows = set()
    for ln in lines[1:]:
        cols = [ln[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.add((cols[0], cols[1], cols[2], cols[3]))
    return rows


def documented(account: str) -> set[Row]:
    readme = (cluster.REPO / "README.md").read_text()
    m = re.search(rf"<!-- can-i {re.escape(account)} -->\s*```text\n(.*?)```", readme, re.S)
    assert m, f"README.md documents no `kubectl auth can-i --list` for {account} (marker <!-- can-i {account} -->)"
    return can_i_rows(m.group(1))


@pytest.mark.parametrize("account", ["meshaccel-agent", "meshaccel-ca"])
def test_service_account_may_do_exactly_what_the_readme_says(account: str) -> None:
    out = kubectl("auth", "can-i", "--list", f"--as=system:serviceaccount:{SYSTEM_NS}:{account}",
                  "-n", SYSTEM_NS).stdout
    actual = can_i_rows(out)
    want = documented(account)
    assert actual == want, (f"{account}: granted but not documented {sorted(actual - want)}; "
                            f"documented but not granted {sorted(want - actual)}")


def _sign_with(token: str) -> str:
    """Ask the CA (through its ClusterIP, from the host) for a workload certificate with this token."""
    from certs.api import CA_SERVER_NAME
    from certs.client import CaClient, server_trust
    from certs.csr import make_csr
    from certs.keys import generate_key
    from certs.signer import SignError
    from certs.spiffe import SpiffeId

    root = cluster.get("configmap", "-n", SYSTEM_NS, "meshaccel-ca-root")["data"]["root-cert.pem"]
    target = f"{cluster.cluster_ip('meshaccel-ca', ns=SYSTEM_NS)}:15012"
    client = CaClient(target, server_trust(root), server_name=CA_SERVER_NAME, token=lambda: token)
    sid = SpiffeId.parse(f"spiffe://cluster.local/ns/{TEST_NS}/sa/default")
    try:
        result = client.sign(make_csr(generate_key(), sid), sid, 3600)
        return f"signed:{len(result.chain_pem)}"
    except SignError as e:
        return f"refused:{e}"
    finally:
        client.close()


def _token(account: str, ns: str, pod: dict) -> str:
    return kubectl("create", "token", account, "-n", ns, "--audience=meshaccel-ca", "--duration=10m",
                   "--bound-object-kind=Pod", f"--bound-object-name={pod['metadata']['name']}",
                   f"--bound-object-uid={pod['metadata']['uid']}").stdout.strip()


def test_ca_refuses_a_token_of_another_account() -> None:
    cluster.apply(cluster.client_pod("rbac-client"))
    try:
        kubectl("wait", "-n", TEST_NS, "--for=condition=Ready", "pod/rbac-client", "--timeout=120s", timeout=150)
        other = cluster.get("pod", "-n", TEST_NS, "rbac-client")
        assert other["spec"]["nodeName"] == NODE
        # The same kind of token the agent presents (audience, pod binding on this node), of another account.
        refused = _sign_with(_token("default", TEST_NS, other))
        assert refused.startswith("refused:") and "UNAUTHENTICATED" in refused, refused
        assert f"system:serviceaccount:{TEST_NS}:default" in refused and "not a node agent" in refused, refused
        # The control: the agent's own account, bound to the agent pod, gets the identity of a pod on its node.
        granted = _sign_with(_token("meshaccel-agent", SYSTEM_NS, cluster.agent_pod()))
        assert granted.startswith("signed:"), granted
        # And the agent itself, with the token the kubelet projects into its pod, got that identity's
        # certificate from the CA (found through the service variables, no DNS).
        want = f"spiffe://cluster.local/ns/{TEST_NS}/sa/default"

        def agent_has_cert() -> dict | None:
            certs = cluster.agent_http("/status")["certs"]["certificates"]
            return next((c for c in certs if c["spiffe_id"] == want and c["serial"] and not c["failures"]), None)

        cluster.poll(agent_has_cert, 60, f"the agent to hold a certificate for {want}")
    finally:
        kubectl("delete", "-n", TEST_NS, "pod/rbac-client", "--wait=false", "--ignore-not-found")
