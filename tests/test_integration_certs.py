"""`accel ca serve` and the agent's cert manager, as real processes on loopback.

The CA learns which pods run on which node from a manifest folder (the same source and state model
as the agent); a node agent's CaClient gets a certificate for a pod on its node and is refused one
for a pod on another node. Then a real `accel agent --ca-address` fetches its pods' SVIDs from the
running CA, shows them in /status and `accel certs --agent`, and follows a pod added to the folder.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from accel.agent_certs import make_signer
from certs.ca import CertificateAuthority
from certs.csr import make_csr
from certs.keys import generate_key, key_pem, load_certs_pem
from certs.signer import SignError
from certs.spiffe import SpiffeId
from certs.store import FileStore
from tests.waiting import wait_until

pytestmark = [pytest.mark.unit]
ROOT = Path(__file__).resolve().parent.parent
WEB = SpiffeId.workload("shop", "web")  # pod on node-a
DB = SpiffeId.workload("shop", "db")  # pod on node-b
LATE = SpiffeId.workload("shop", "late")  # a pod that appears on node-a later


def pod(name: str, node: str, sa: str, ip: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
                       "spec": {"nodeName": node, "serviceAccountName": sa},
                       "status": {"phase": "Running", "podIPs": [{"ip": ip}]}})


def accel(*argv: str) -> list[str]:
    return [sys.executable, "-m", "accel.cli", *argv]


def start(argv: list[str], marker: str) -> tuple[subprocess.Popen[str], str]:
    """Start a long-running accel process; return it and its first stdout line (which has `marker`)."""
    proc = subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if marker not in line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"no {marker!r} in {line!r}; stderr:\n{err[-3000:]}")
    return proc, line.strip()


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise AssertionError("process did not stop on SIGTERM") from None


def node_credential(ca_dir: Path, node: str, out: Path) -> Path:
    subprocess.run(accel("ca", "issue-node", node, "--dir", str(ca_dir), "--out", str(out)), cwd=ROOT, check=True,
                   capture_output=True)
    return out


@pytest.fixture
def ca_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A CA folder, a manifest folder (web on node-a, db on node-b) and `accel ca serve` on them."""
    ca_dir, folder = tmp_path / "ca", tmp_path / "manifests"
    subprocess.run(accel("ca", "init", "--dir", str(ca_dir)), cwd=ROOT, check=True, capture_output=True)
    folder.mkdir()
    (folder / "web.yaml").write_text(pod("web", "node-a", "web", "10.0.0.1"))
    (folder / "db.yaml").write_text(pod("db", "node-b", "db", "10.0.1.1"))
    proc, line = start(accel("ca", "serve", "--dir", str(ca_dir), "--listen", "127.0.0.1:0",
                             "--pods", f"manifests:{folder}"), "listening on")
    try:
        assert "2 pods known" in line, line
        yield line.rsplit(" ", 1)[1], ca_dir, folder
    finally:
        assert stop(proc) == 0


def sign(signer: Any, sid: SpiffeId) -> list[x509.Certificate]:
    key = generate_key()
    result = signer.sign(make_csr(key, sid), sid, 3600)
    return [c for pem in result.chain_pem for c in load_certs_pem(pem)]


def test_ca_serve_authorizes_only_pods_on_the_callers_node(ca_server: tuple[str, Path, Path], tmp_path: Path) -> None:
    address, ca_dir, folder = ca_server
    signer = make_signer(address, node_credential(ca_dir, "node-a", tmp_path / "node-a"), None)
    try:
        chain = sign(signer, WEB)
        sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
        ca = CertificateAuthority(FileStore(ca_dir).load())  # type: ignore[arg-type]
        assert chain[-1].issuer == ca.chain[-1].subject

        with pytest.raises(SignError, match=r"PERMISSION_DENIED: node node-a runs no pod with identity "
                                            r"spiffe://cluster.local/ns/shop/sa/db"):
            sign(signer, DB)
        # The CA follows the folder: a pod scheduled on node-a later is authorized once it appears.
        with pytest.raises(SignError, match="PERMISSION_DENIED"):
            sign(signer, LATE)
        (folder / "late.yaml").write_text(pod("late", "node-a", "late", "10.0.0.2"))

        def late_ok() -> bool:
            try:
                return bool(sign(signer, LATE))
            except SignError:
                return False

        wait_until(late_ok, what="the CA to see the new pod on node-a")
    finally:
        signer.close()  # type: ignore[attr-defined]

    # node-b's own credential gets db and not web.
    signer_b = make_signer(address, node_credential(ca_dir, "node-b", tmp_path / "node-b"), None)
    try:
        assert sign(signer_b, DB)
        with pytest.raises(SignError, match="PERMISSION_DENIED"):
            sign(signer_b, WEB)
    finally:
        signer_b.close()  # type: ignore[attr-defined]

    # A credential from another CA is not a node of this one.
    other = CertificateAuthority.create_root()
    key = generate_key()
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "node-cert.pem").write_text("".join(other.issue_node_cert("node-a", key.public_key())))
    (forged / "node-key.pem").write_text(key_pem(key))
    (forged / "root-cert.pem").write_text((tmp_path / "node-a" / "root-cert.pem").read_text())
    signer_f = make_signer(address, forged, None)
    try:
        with pytest.raises(SignError, match="UNAUTHENTICATED"):
            sign(signer_f, WEB)
    finally:
        signer_f.close()  # type: ignore[attr-defined]


def agent_status(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/status", timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def test_agent_gets_its_pods_certificates_from_ca_serve(ca_server: tuple[str, Path, Path], tmp_path: Path) -> None:
    address, ca_dir, folder = ca_server
    cred = node_credential(ca_dir, "node-a", tmp_path / "cred")
    status_file = tmp_path / "certs.json"
    proc, line = start(accel("agent", "--node", "node-a", "--source", f"manifests:{folder}", "--maps", "memory",
                             "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
                             "--ca-address", address, "--node-credential", str(cred),
                             "--cert-status-file", str(status_file)), "listening on http://")
    base = line.rsplit(" ", 1)[1]
    try:
        def serials() -> dict[str, str | None]:
            certs = agent_status(base)["certs"]
            return {c["spiffe_id"]: c["serial"] for c in certs["certificates"]}

        # Only node-a's pod: db runs on node-b and is never asked for.
        wait_until(lambda: set(serials()) == {str(WEB)} and serials()[str(WEB)] is not None, what="web's SVID")
        (folder / "late.yaml").write_text(pod("late", "node-a", "late", "10.0.0.2"))
        wait_until(lambda: set(serials()) == {str(WEB), str(LATE)} and all(serials().values()), what="late's SVID")
        (folder / "late.yaml").unlink()
        wait_until(lambda: set(serials()) == {str(WEB)}, what="late's SVID forgotten")
        assert agent_status(base)["certs"]["failing"] == 0

        out = subprocess.run(accel("certs", "--agent", base, "--json"), cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        rows = json.loads(out)
        assert [r["spiffe_id"] for r in rows] == [str(WEB)] and rows[0]["serial"] == serials()[str(WEB)]
        # The same rows from the status file the manager writes (plain `accel certs`).
        wait_until(lambda: status_file.exists() and len(json.loads(status_file.read_text())["identities"]) == 1,
                   what="status file")
        text = subprocess.run(accel("certs", "--status-file", str(status_file)), cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        assert str(WEB) in text and "ok" in text

        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "meshaccel_state_objects" in metrics
    finally:
        assert stop(proc) == 0
    # Keys stay in the agent's memory: nothing it wrote holds one.
    written = [status_file, *(p for p in (tmp_path / "state").rglob("*") if p.is_file())]
    assert all("PRIVATE KEY" not in p.read_text(errors="replace") for p in written)
