"""`accel ca init`, `accel ca rotate-root`, `accel ca issue-node`, `accel certs` in standalone mode."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from accel.commands import ca as ca_cmd
from accel.errors import UserError
from certs.ca import CertificateAuthority
from certs.store import FileStore

pytestmark = pytest.mark.unit


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="accel")
    ca_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_init_rotate_issue_node_and_certs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "ca")
    assert run("ca", "init", "--dir", d, "--key-type", "rsa-3072", "--validity-days", "365") == 0
    assert "created CA in folder" in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600
    with pytest.raises(UserError, match="already holds a CA"):
        run("ca", "init", "--dir", d)
    first = FileStore(d).load()
    assert first is not None

    assert run("ca", "rotate-root", "prepare", "--dir", d) == 0
    assert "2 root(s) trusted" in capsys.readouterr().out
    with pytest.raises(UserError, match="already prepared"):
        run("ca", "rotate-root", "prepare", "--dir", d)
    assert run("ca", "rotate-root", "activate", "--dir", d) == 0
    active = CertificateAuthority(FileStore(d).load())  # type: ignore[arg-type]
    assert active.material.ca_cert != first.ca_cert and len(active.roots) == 2
    assert run("ca", "rotate-root", "finish", "--dir", d) == 0
    assert "1 root(s) trusted" in capsys.readouterr().out

    out = tmp_path / "node"
    assert run("ca", "issue-node", "node-1", "--dir", d, "--out", str(out)) == 0
    assert stat.S_IMODE((out / "node-key.pem").stat().st_mode) == 0o600
    node_leaf = x509.load_pem_x509_certificates((out / "node-cert.pem").read_bytes())[0]
    san = node_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/meshaccel/node/node-1"]
    capsys.readouterr()

    ids = ["spiffe://cluster.local/ns/default/sa/web", "spiffe://cluster.local/ns/default/sa/db"]
    assert run("certs", "--ca-dir", d, "--json", "--identity", ids[0], "--identity", ids[1]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["spiffe_id"] for r in rows) == sorted(ids)
    assert all(r["serial"] and r["not_after"] > r["next_refresh"] for r in rows)
    assert run("certs", "--ca-dir", d, "--identity", ids[0]) == 0
    table = capsys.readouterr().out
    assert "IDENTITY" in table and ids[0] in table and " ok" in table


def test_certs_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found: is the agent running"):
        run("certs", "--status-file", str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="no CA in folder"):
        run("certs", "--ca-dir", str(tmp_path), "--identity", "spiffe://cluster.local/ns/a/sa/b")
    run("ca", "init", "--dir", str(tmp_path / "ca"))
    with pytest.raises(UserError, match="must start with spiffe://"):
        run("certs", "--ca-dir", str(tmp_path / "ca"), "--identity", "https://example.com")
    with pytest.raises(UserError, match="NAMESPACE/NAME"):
        run("ca", "init", "--secret", "justaname")
