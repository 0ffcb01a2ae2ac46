"""An HBONE client for tests, run inside a lab pod: `python -m tests.hbone_client --addr IP:15008 ...`.

It speaks what ztunnel speaks (TLS 1.3, ALPN h2, a client certificate, HTTP/2 CONNECT with
`:authority` = the original ip:port) and can be told to get each part wrong, so the tests can check
how our inbound listener refuses bad peers. It prints one JSON line:
  {"status": 200|400|401|503|null, "reply": "<bytes read after sending --send>", "serial": "<server cert
   serial, hex>", "alpn": ..., "error": "<why it failed, if it did>"}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
from cryptography import x509


def _context(args: argparse.Namespace) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE certificates name a URI, not a host
    ctx.load_verify_locations(args.ca)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    if args.tls12:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if args.alpn:
        ctx.set_alpn_protocols([args.alpn])
    return ctx


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"status": None, "reply": "", "serial": None, "alpn": None, "error": None}
    host, _, port = args.addr.rpartition(":")
    raw = socket.create_connection((host.strip("[]"), int(port)), timeout=args.timeout)
    if args.stall:
        time.sleep(args.stall)  # a client that connects and says nothing
    try:
        tls = _context(args).wrap_socket(raw)
    except (ssl.SSLError, OSError) as e:
        out["error"] = f"tls: {e}"
        return out
    der = tls.getpeercert(binary_form=True)
    if der:
        out["serial"] = format(x509.load_der_x509_certificate(der).serial_number, "x")
    out["alpn"] = tls.selected_alpn_protocol()
    if args.garbage:
        try:
            tls.sendall(os.urandom(512))
            out["reply"] = tls.recv(4096).hex()
            out["error"] = "closed" if out["reply"] == "" else None
        except (ssl.SSLError, OSError) as e:
            out["error"] = f"closed: {e}"
        return out
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    if args.method == "CONNECT":
        headers = [(":method", "CONNECT"), (":authority", args.authority)]
    else:
        headers = [(":method", args.method), (":scheme", "https"), (":path", "/"), (":authority", args.authority)]
    conn.send_headers(1, headers, end_stream=args.method != "CONNECT")
    tls.sendall(conn.data_to_send())
    reply = b""
    sent = False
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            data = tls.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    out["status"] = int(dict(ev.headers)[":status"])
                    if out["status"] == 200 and args.send and not sent:
                        conn.send_data(1, args.send.encode(), end_stream=True)
                        sent = True
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    reply += ev.data
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    deadline = 0  # done
            pending = conn.data_to_send()
            if pending:
                tls.sendall(pending)
            if out["status"] is not None and out["status"] != 200:
                break
            if out["status"] == 200 and not args.send:
                break
    except (ssl.SSLError, OSError) as e:
        out["error"] = f"stream: {e}"
    out["reply"] = reply.decode(errors="replace")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True, help="IP:PORT of the HBONE listener")
    ap.add_argument("--authority", default="", help="the :authority (the original destination ip:port)")
    ap.add_argument("--ca", required=True, help="roots to check the server against")
    ap.add_argument("--cert", default="", help="client certificate chain (PEM); none: send no certificate")
    ap.add_argument("--key", default="")
    ap.add_argument("--alpn", default="h2", help="ALPN to offer; '' offers none")
    ap.add_argument("--tls12", action="store_true", help="a TLS 1.2-only client")
    ap.add_argument("--method", default="CONNECT")
    ap.add_argument("--send", default="", help="bytes to send through the tunnel once it is up (then half-close)")
    ap.add_argument("--garbage", action="store_true", help="random bytes after the TLS handshake instead of HTTP/2")
    ap.add_argument("--stall", type=float, default=0.0, help="seconds to say nothing after connecting")
    ap.add_argument("--timeout", type=float, default=15.0)
    args = ap.parse_args()
    try:
        doc = run(args)
    except (OSError, ValueError) as e:
        doc = {"status": None, "reply": "", "serial": None, "alpn": None, "error": f"connect: {e}"}
    print(json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
