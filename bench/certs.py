"""`python -m bench certs [--json]`: CSR signing throughput and agent memory per 1,000 identities.

Baseline: RSA-2048 workload keys (what many meshes and older Istio defaults use).
Candidate: ECDSA P-256 workload keys (our default, and what istiod delegation requires).
Both are signed by the same ECDSA P-256 root CA in the same run, and measured three ways:
- `ca_sign_rate_per_second`: the CA alone, validating and signing pre-made CSRs;
- `grpc_issue_rate_per_second`: one agent through the CSR API on loopback (TLS, node credential
  with proof, CSR validation, signing, chain check on the agent), keygen excluded;
- `agent_bytes_per_1000_identities`: Python heap retained by a CertManager holding N SVIDs
  (tracemalloc after prefetch), scaled to 1,000 identities.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from typing import Any

from bench.common import report
from certs.api import CA_SERVER_NAME, CertificateService, serve, server_credentials
from certs.ca import CertificateAuthority
from certs.client import CaClient, server_trust
from certs.csr import make_csr
from certs.keys import KeyType, generate_key
from certs.manager import CertManager
from certs.signer import LocalSigner
from certs.spiffe import SpiffeId


def ids(n: int) -> list[SpiffeId]:
    return [SpiffeId.workload(f"ns{i % 50}", f"sa{i}") for i in range(n)]


def csrs(key_type: KeyType, n: int) -> list[tuple[SpiffeId, str]]:
    return [(sid, make_csr(generate_key(key_type), sid)) for sid in ids(n)]


def ca_sign_rate(ca: CertificateAuthority, reqs: list[tuple[SpiffeId, str]]) -> float:
    t = time.perf_counter()
    for sid, csr in reqs:
        ca.sign_csr(csr, 86400, expected=sid)
    return len(reqs) / (time.perf_counter() - t)


def grpc_issue_rate(ca: CertificateAuthority, reqs: list[tuple[SpiffeId, str]]) -> float:
    wanted = {sid for sid, _ in reqs}
    server, port = serve(CertificateService(ca, lambda node: wanted), "127.0.0.1:0", server_credentials(ca))
    try:
        key = generate_key()
        client = CaClient(
            f"127.0.0.1:{port}",
            server_trust(ca.trust_bundle_pem()),
            server_name=CA_SERVER_NAME,
            node_credential=("".join(ca.issue_node_cert("bench-node", key.public_key())), key),
        )
        client.sign(reqs[0][1], reqs[0][0], 86400)  # warm the channel: connect + TLS handshake
        t = time.perf_counter()
        for sid, csr in reqs:
            client.sign(csr, sid, 86400)
        rate = len(reqs) / (time.perf_counter() - t)
        client.close()
        return rate
    finally:
        server.stop(None)


def agent_bytes_per_1000(ca: CertificateAuthority, key_type: KeyType, n: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        manager = CertManager(LocalSigner(ca), key_type=key_type)
        manager.set_identities(ids(n))
        manager.prefetch()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        assert len(manager.identities()) == n and all(manager.get(s) for s in manager.identities())
    finally:
        tracemalloc.stop()
    return held / n * 1000


def measure(key_type: KeyType, args: argparse.Namespace, ca: CertificateAuthority) -> dict[str, float]:
    print(f"  {key_type}: generating {args.csrs} keys and CSRs ...", file=sys.stderr, flush=True)
    reqs = csrs(key_type, args.csrs)
    print(f"  {key_type}: CA signing, gRPC issuance, agent memory ({args.identities} identities) ...",
          file=sys.stderr, flush=True)
    return {
        "ca_sign_rate_per_second": ca_sign_rate(ca, reqs),
        "grpc_issue_rate_per_second": grpc_issue_rate(ca, reqs),
        "agent_bytes_per_1000_identities": agent_bytes_per_1000(ca, key_type, args.identities),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench certs", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--csrs", type=int, default=150, help="CSRs signed per key type (default 150)")
    p.add_argument("--identities", type=int, default=250,
                   help="identities held by the agent for the memory figure (default 250, scaled to 1,000; "
                        "RSA key generation makes 1,000 slow)")
    args = p.parse_args(argv)
    if args.csrs < 1 or args.identities < 1:
        print("bench certs: --csrs and --identities must be at least 1", file=sys.stderr)
        return 2
    ca = CertificateAuthority.create_root(key_type="ec-p256")
    baseline = measure("rsa-2048", args, ca)
    candidate = measure("ec-p256", args, ca)
    ratio = {k: candidate[k] / baseline[k] for k in baseline}
    extra: dict[str, Any] = {
        "baseline_is": "RSA-2048 workload keys",
        "candidate_is": "ECDSA P-256 workload keys",
        "ca_key": "ECDSA P-256 root",
        "csrs_per_key_type": args.csrs,
        "identities_measured": args.identities,
    }
    report("certs", baseline, candidate, ratio, args.json, extra)
    return 0
