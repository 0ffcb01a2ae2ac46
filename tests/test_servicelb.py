"""Socket-level service load balancing: the real sock_lb.c programs in a lab, driven through the real
state model and reconciler (accel/servicelb.py). Clients and backends are real sockets in pod
namespaces; service addresses (10.96.0.0/16, fd00:96::/112) exist only inside the lab."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from accel.lab import Lab
from accel.metrics import Metrics
from accel.servicelb import ServiceLBReconciler, desired, netns_cookie
from accel.state.model import (
    EMPTY_MAP,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Event,
    EventType,
    Kind,
    ObjectKey,
    Pod,
    Service,
    ServicePort,
    frozen_map,
)
from accel.state.store import ClusterState
from sockops_bpf import layout, loader
from sockops_bpf.errors import BpfError
from sockops_bpf.maps import Backend, Frontend, LbMaps, open_lb
from tests.conftest import leftovers, require

NODE = "node1"
SERVICE_CIDRS = ("10.96.0.0/16", "fd00:96::/112")
PORT = 8080  # every backend listens here (TCP and UDP, v4 and v6) and answers with its pod name

# A backend: answers each TCP connection with its name, then echoes; answers each datagram with its name.
PEER_SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1].encode(), int(sys.argv[2])
def conn(c):
    with c:
        c.sendall(name + b"\n")
        while (d := c.recv(4096)):
            c.sendall(d)
def tcp(af, host):
    s = socket.socket(af, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if af == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port)); s.listen(1024)
    return s
def udp(af, host):
    s = socket.socket(af, socket.SOCK_DGRAM)
    if af == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    return s
def accept_loop(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
def udp_loop(s):
    while True:
        d, peer = s.recvfrom(4096)
        s.sendto(name, peer)
socks = [tcp(socket.AF_INET, "0.0.0.0"), tcp(socket.AF_INET6, "::")]
dgrams = [udp(socket.AF_INET, "0.0.0.0"), udp(socket.AF_INET6, "::")]
for s in socks:
    threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
for s in dgrams:
    threading.Thread(target=udp_loop, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# A client: N TCP connections (or UDP exchanges) to host:port; prints one JSON line of what it saw.
PEER_CLIENT = r"""
import collections, json, socket, sys
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
af = socket.AF_INET6 if ":" in host else socket.AF_INET
names, peers, errors = collections.Counter(), collections.Counter(), collections.Counter()
for _ in range(n):
    if mode == "tcp":
        s = socket.socket(af, socket.SOCK_STREAM)
        try:
            s.connect((host, port))
            peers[str(s.getpeername()[:2])] += 1
            names[s.makefile("rb").readline().strip().decode()] += 1
        except OSError as e:
            errors[e.errno] += 1
        finally:
            s.close()
    else:
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.settimeout(5)
        try:
            s.sendto(b"q", (host, port))
            data, src = s.recvfrom(4096)
            names[data.decode()] += 1
            peers[str(src[:2])] += 1
        except OSError as e:
            errors[e.errno or 0] += 1
        finally:
            s.close()
print(json.dumps({"names": names, "peers": peers, "errors": errors}))
"""

# A long-lived connection: prints the backend's name, then for every stdin line echoes it through.
PEER_HOLD = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port))
f = s.makefile("rb")
print(f.readline().strip().decode(), flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(f.readline().strip().decode(), flush=True)
"""

pytestmark = [pytest.mark.lab]


# ---- records ---------------------------------------------------------------------------------------


def service(name: str, vips: tuple[str, ...], ports: tuple[ServicePort, ...] | None = None, *,
            selectorless: bool = False, affinity: str = "None", timeout: int | None = None,
            itp: str = "Cluster") -> Service:
    return Service(name=name, namespace="default", uid=f"uid-{name}", type="ClusterIP", cluster_ips=vips,
                   ports=ports if ports is not None else (ServicePort("http", "TCP", 80, "web"),),
                   selector=None if selectorless else frozen_map({"app": name}),
                   session_affinity=affinity, session_affinity_timeout=timeout, internal_traffic_policy=itp,
                   labels=EMPTY_MAP, annotations=EMPTY_MAP)


def ep(ip: str, ready: bool = True, serving: bool | None = None, terminating: bool = False,
       node: str = NODE) -> Endpoint:
    return Endpoint(addresses=(ip,), ready=ready, serving=ready if serving is None else serving,
                    terminating=terminating, node_name=node)


def eps(name: str, svc: str, endpoints: tuple[Endpoint, ...], family: str = "IPv4",
        ports: tuple[EndpointPort, ...] = (EndpointPort("http", "TCP", PORT),)) -> EndpointSlice:
    return EndpointSlice(name=name, namespace="default", service_name=svc, address_type=family,
                         endpoints=endpoints, ports=ports)


def pod(name: str, ip: str, labels: dict[str, str] | None = None) -> Pod:
    return Pod(name=name, namespace="default", uid=f"uid-{name}", node=NODE, ips=(ip,), labels=frozen_map(labels),
               service_account="default", annotations=EMPTY_MAP, phase="Running", ready=True, host_network=False)


def add(*records: Any) -> list[Event]:
    return [Event(EventType.ADDED, r) for r in records]


def delete(*records: Any) -> list[Event]:
    return [Event(EventType.DELETED, r) for r in records]


# ---- unit: layouts and desired state ------------------------------------------------------------------


class Problems:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, reason: str, key: ObjectKey, detail: str, message: str) -> None:
        self.seen.append((reason, message))

    def reasons(self) -> set[str]:
        return {r for r, _ in self.seen}


@pytest.mark.unit
def test_ready_endpoints_only_terminating_as_fallback_and_named_ports() -> None:
    svc = service("web", ("10.96.1.1",), (ServicePort("http", "TCP", 80, "web"), ServicePort("dns", "UDP", 53, 53)))
    sl = eps("web-1", "web", (ep("10.1.0.1"), ep("10.1.0.2", ready=False, serving=True, terminating=True),
                              ep("10.1.0.3", ready=False, serving=False)),
             ports=(EndpointPort("http", "TCP", 8081), EndpointPort("dns", "UDP", 5353)))
    p = Problems()
    d = desired(svc, [sl], NODE, p)
    assert d[Frontend("10.96.1.1", 80, 6)].backends == (Backend("10.1.0.1", 8081),)  # targetPort "web" -> 8081
    assert d[Frontend("10.96.1.1", 53, 17)].backends == (Backend("10.1.0.1", 5353),)
    # nothing ready: serving-and-terminating ones take over; not-serving ones never
    sl2 = eps("web-1", "web", (ep("10.1.0.2", ready=False, serving=True, terminating=True),
                               ep("10.1.0.3", ready=False, serving=False, terminating=True)),
              ports=(EndpointPort("http", "TCP", 8081),))
    d = desired(svc, [sl2], NODE, p)
    assert d[Frontend("10.96.1.1", 80, 6)].backends == (Backend("10.1.0.2", 8081),)
    assert d[Frontend("10.96.1.1", 53, 17)].backends == ()  # the slice has no "dns" port: refused
    assert p.seen == []


@pytest.mark.unit
def test_internal_traffic_policy_local_and_affinity_settings() -> None:
    svc = service("loc", ("10.96.1.2",), itp="Local", affinity="ClientIP", timeout=30)
    sl = eps("loc-1", "loc", (ep("10.1.0.1", node=NODE), ep("10.1.0.2", node="node2")),
             ports=(EndpointPort("http", "TCP", 8080),))
    spec = desired(svc, [sl], NODE, Problems())[Frontend("10.96.1.2", 80, 6)]
    assert spec.backends == (Backend("10.1.0.1", 8080),)
    assert (spec.flags, spec.affinity_timeout) == (layout.LB_F_AFFINITY, 30)
    assert desired(svc, [sl], "node3", Problems())[Frontend("10.96.1.2", 80, 6)].backends == ()
    default = desired(service("aff", ("10.96.1.3",), affinity="ClientIP"), [], NODE, Problems())
    assert default[Frontend("10.96.1.3", 80, 6)].affinity_timeout == 10800


@pytest.mark.unit
def test_bad_input_is_reported_and_skipped_the_rest_is_kept() -> None:
    p = Problems()
    svc = service("bad", ("10.96.1.4", "not-an-ip"), (ServicePort("zero", "TCP", 0, 80), ServicePort("ok", "TCP", 81, 81),
                                                      ServicePort("sctp", "SCTP", 82, 82)), selectorless=True)
    d = desired(svc, [], NODE, p)
    assert list(d) == [Frontend("10.96.1.4", 81, 6)]  # the valid port of the valid address survives
    assert {"service_port_invalid", "cluster_ip_invalid", "protocol_unsupported",
            "service_without_selector"} <= p.reasons()
    sl = eps("fam", "fam", (ep("fd00::5"), ep("10.1.0.9")), ports=(EndpointPort("http", "TCP", 0),))
    sl_ok = eps("fam2", "fam", (ep("fd00::5"), ep("10.1.0.9")))
    d = desired(service("fam", ("10.96.1.5",)), [sl, sl_ok], NODE, p)
    assert d[Frontend("10.96.1.5", 80, 6)].backends == (Backend("10.1.0.9", PORT),)
    assert {"endpoint_port_invalid", "endpoint_address_family"} <= p.reasons()
    many = eps("many", "many", tuple(ep(f"10.2.{i // 250}.{i % 250 + 1}") for i in range(40)))
    d = desired(service("many", ("10.96.1.6",)), [many], NODE, p, max_backends=32)
    assert len(d[Frontend("10.96.1.6", 80, 6)].backends) == 32
    assert "too_many_backends" in p.reasons()
    assert all(msg.startswith("object=") and "\n" not in msg for _, msg in p.seen)


# ---- the lab ---------------------------------------------------------------------------------------


class LbLab:
    """One lab (5 pods: pod1 client, pod2-4 backends, pod5 excluded client) with the model,
    reconciler and maps wired as the agent wires them."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.maps: LbMaps = open_lb(loader.pin_dir(lab.instance))
        self.metrics = Metrics()
        self.state = ClusterState()
        cookies = {lab.pod(n).ipv4: netns_cookie(f"/run/netns/{lab.pod(n).netns}") for n in lab.pods}
        self.rec = ServiceLBReconciler(NODE, self.maps, self.metrics, service_cidrs=SERVICE_CIDRS,
                                       netns_cookie_of=lambda p: cookies.get(p.ips[0]) if p.ips else None)
        self.rec.state = self.state
        self.state.subscribe(self.rec.on_change)
        self.servers: list[subprocess.Popen[str]] = []

    def apply(self, events: list[Event]) -> None:
        self.state.apply(events, synced=True)

    def backends(self, *names: str, family: str = "IPv4", **kw: Any) -> tuple[Endpoint, ...]:
        attr = "ipv4" if family == "IPv4" else "ipv6"
        return tuple(ep(getattr(self.lab.pod(n), attr), **kw) for n in names)

    def client(self, where: str, mode: str, host: str, port: int, n: int) -> dict[str, Counter[str]]:
        argv = [sys.executable, "-c", PEER_CLIENT, mode, host, str(port), str(n)]
        cmd = self.lab.node_command(argv) if where == "node" else self.lab.command(where, argv)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        doc = json.loads(out.stdout)
        return {k: Counter(v) for k, v in doc.items()}

    def close(self) -> None:
        for s in self.servers:
            s.kill()
            s.wait()
        self.maps.close()


@pytest.fixture(scope="module")
def lb() -> Iterator[LbLab]:
    import os

    require(os.geteuid() == 0, "needs root for eBPF, cgroups and network namespaces")
    try:
        import bcc  # noqa: F401

        from sockops_bpf.headers import find_kernel_headers

        find_kernel_headers()
    except (ImportError, BpfError) as e:
        require(False, f"eBPF toolchain unusable: {e}")
    lab = Lab(5)
    try:
        lab.up()
        env = LbLab(lab)
        try:
            for name in ("pod2", "pod3", "pod4"):
                s = lab.popen(name, [sys.executable, "-c", PEER_SERVER, name, str(PORT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
                env.servers.append(s)
                assert s.stdout is not None and s.stdout.readline().strip() == "ready"
            yield env
        finally:
            env.close()
    finally:
        lab.down()
        assert leftovers(lab.id) == [], f"lab {lab.id} left {leftovers(lab.id)}"


def counters(lb: LbLab) -> dict[str, int]:
    return lb.maps.counters()


def test_clusterip_spreads_1000_connections_and_getpeername_gives_the_vip(lb: LbLab) -> None:
    vip = "10.96.0.10"
    svc = service("spread", (vip,))
    lb.apply(add(svc, eps("spread-1", "spread", lb.backends("pod2", "pod3", "pod4"),
                          ports=(EndpointPort("http", "TCP", PORT),))))
    assert lb.rec.matches_maps()
    got = lb.client("pod1", "tcp", vip, 80, 1000)
    assert got["errors"] == Counter()
    assert sum(got["names"].values()) == 1000
    assert set(got["names"]) == {"pod2", "pod3", "pod4"}
    assert min(got["names"].values()) >= 200, got["names"]  # each backend gets at least 20 %
    assert got["peers"] == Counter({f"('{vip}', 80)": 1000}), got["peers"]
    assert counters(lb)["lb_translated"] >= 1000


def test_session_affinity_keeps_one_client_on_one_backend(lb: LbLab) -> None:
    vip = "10.96.0.11"
    svc = service("sticky", (vip,), affinity="ClientIP", timeout=300)
    lb.apply(add(svc, eps("sticky-1", "sticky", lb.backends("pod2", "pod3", "pod4"))))
    hits = counters(lb)["lb_affinity_hit"]
    a = lb.client("pod1", "tcp", vip, 80, 60)
    b = lb.client("pod5", "tcp", vip, 80, 60)
    assert len(a["names"]) == 1 and sum(a["names"].values()) == 60, a
    assert len(b["names"]) == 1 and sum(b["names"].values()) == 60, b
    assert counters(lb)["lb_affinity_hit"] - hits >= 118
    # the affinity entry's backend scaled away: the client moves to a remaining one and sticks there
    (first,) = a["names"]
    remaining = tuple(n for n in ("pod2", "pod3", "pod4") if n != first)
    lb.apply([Event(EventType.MODIFIED, eps("sticky-1", "sticky", lb.backends(*remaining)))])
    c = lb.client("pod1", "tcp", vip, 80, 30)
    assert len(c["names"]) == 1 and set(c["names"]) <= set(remaining), c


def test_udp_through_a_clusterip_the_reply_comes_from_the_vip(lb: LbLab) -> None:
    vip = "10.96.0.53"
    svc = service("dns", (vip,), (ServicePort("dns", "UDP", 53, "dns"),))
    lb.apply(add(svc, eps("dns-1", "dns", lb.backends("pod2", "pod3"), ports=(EndpointPort("dns", "UDP", PORT),))))
    got = lb.client("pod1", "udp", vip, 53, 100)
    assert got["errors"] == Counter(), got
    assert set(got["names"]) == {"pod2", "pod3"}
    assert got["peers"] == Counter({f"('{vip}', 53)": 100}), got["peers"]  # recvmsg shows the service address


def test_scale_a_backend_away_new_connections_avoid_it_established_ones_continue(lb: LbLab) -> None:
    vip = "10.96.0.12"
    svc = service("scale", (vip,))
    lb.apply(add(svc, eps("scale-1", "scale", lb.backends("pod2", "pod3", "pod4"))))
    holds = []
    for _ in range(6):  # long-lived connections, spread over the backends
        h = lb.lab.popen("pod1", [sys.executable, "-c", PEER_HOLD, vip, "80"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        assert h.stdout is not None
        holds.append((h, h.stdout.readline().strip()))
    try:
        victim = holds[0][1]
        keep = tuple(n for n in ("pod2", "pod3", "pod4") if n != victim)
        before = lb.rec.map_ops
        lb.apply([Event(EventType.MODIFIED, eps("scale-1", "scale", lb.backends(*keep)))])
        assert lb.rec.map_ops - before <= 5  # a handful of map operations
        got = lb.client("pod1", "tcp", vip, 80, 200)
        assert got["errors"] == Counter() and victim not in got["names"], got
        assert set(got["names"]) == set(keep)
        for h, name in holds:  # established connections, the victim's included, still reach their backend
            assert h.stdin is not None and h.stdout is not None
            h.stdin.write(f"still-{name}\n")
            h.stdin.flush()
            assert h.stdout.readline().strip() == f"still-{name}"
        assert any(name == victim for _, name in holds)
    finally:
        for h, _ in holds:
            h.kill()
            h.wait()


def test_service_deleted_or_without_backends_refuses_at_once(lb: LbLab) -> None:
    vip = "10.96.0.13"
    svc = service("gone", (vip,))
    sl = eps("gone-1", "gone", lb.backends("pod2"))
    lb.apply(add(svc, sl))
    assert lb.client("pod1", "tcp", vip, 80, 5)["names"] == Counter({"pod2": 5})
    lb.apply([Event(EventType.MODIFIED, eps("gone-1", "gone", ()))])  # no endpoint left
    assert lb.client("pod1", "tcp", vip, 80, 3)["errors"] == Counter({str(errno.ECONNREFUSED): 3})
    lb.apply(add(sl))
    assert lb.client("pod1", "tcp", vip, 80, 3)["names"] == Counter({"pod2": 3})
    assert counters(lb)["lb_no_backend"] >= 3
    lb.apply(delete(svc))
    assert Frontend(vip, 80, 6) not in lb.maps.services
    # deleted: still inside the service range, so refused at once rather than sent anywhere
    assert lb.client("pod1", "tcp", vip, 80, 3)["errors"] == Counter({str(errno.ECONNREFUSED): 3})
    assert lb.client("pod1", "udp", vip, 80, 1)["errors"] == Counter({str(errno.ECONNREFUSED): 1})
    assert counters(lb)["lb_no_service"] >= 4
    assert sorted(lb.maps.service_cidrs) == sorted(SERVICE_CIDRS)
    # outside every service range nothing is touched: this lab has no route there
    assert lb.client("pod1", "tcp", "10.97.0.1", 80, 1)["errors"] == Counter({str(errno.ENETUNREACH): 1})


def test_ipv6_service(lb: LbLab) -> None:
    vip = "fd00:96::20"
    svc = service("six", (vip,))
    lb.apply(add(svc, eps("six-1", "six", lb.backends("pod3", "pod4", family="IPv6"), family="IPv6")))
    got = lb.client("pod1", "tcp", vip, 80, 100)
    assert got["errors"] == Counter() and set(got["names"]) == {"pod3", "pod4"}, got
    assert got["peers"] == Counter({f"('{vip}', 80)": 100})
    udp = service("six-dns", (vip,), (ServicePort("dns", "UDP", 53, "dns"),))
    lb.apply(add(udp, eps("six-dns-1", "six-dns", lb.backends("pod2", family="IPv6"), family="IPv6",
                          ports=(EndpointPort("dns", "UDP", PORT),))))
    got = lb.client("pod1", "udp", vip, 53, 20)
    assert got["names"] == Counter({"pod2": 20}) and got["peers"] == Counter({f"('{vip}', 53)": 20}), got


def test_host_network_client(lb: LbLab) -> None:
    """A process in the node's own namespace and cgroup (hostNetwork) goes through the same hooks."""
    vip = "10.96.0.14"
    lb.apply(add(service("host", (vip,)), eps("host-1", "host", lb.backends("pod2", "pod4"))))
    got = lb.client("node", "tcp", vip, 80, 100)
    assert got["errors"] == Counter() and set(got["names"]) == {"pod2", "pod4"}, got
    assert got["peers"] == Counter({f"('{vip}', 80)": 100})


def test_excluded_and_istio_pods_keep_the_service_address(lb: LbLab) -> None:
    vip = "10.96.0.15"
    lab = lb.lab
    lb.apply(add(service("mesh", (vip,)), eps("mesh-1", "mesh", lb.backends("pod2")),
                 pod("client5", lab.pod("pod5").ipv4, {"meshaccel.io/exclude": "true"}),
                 pod("client1", lab.pod("pod1").ipv4)))
    skipped = counters(lb)["lb_skipped"]
    # pod5 keeps the VIP: with no route to it in the lab, the connect fails as it would without us
    assert lb.client("pod5", "tcp", vip, 80, 2)["errors"] == Counter({str(errno.ENETUNREACH): 2})
    assert counters(lb)["lb_skipped"] - skipped == 2
    assert lb.client("pod1", "tcp", vip, 80, 2)["names"] == Counter({"pod2": 2})
    # label removed: pod5 is translated again
    lb.apply([Event(EventType.MODIFIED, pod("client5", lab.pod("pod5").ipv4))])
    assert lb.client("pod5", "tcp", vip, 80, 2)["names"] == Counter({"pod2": 2})
    lb.apply([Event(EventType.MODIFIED, pod("client5", lab.pod("pod5").ipv4, {"istio.io/dataplane-mode": "ambient"}))])
    assert lb.client("pod5", "tcp", vip, 80, 1)["errors"] == Counter({str(errno.ENETUNREACH): 1})
    lb.apply(delete(pod("client5", lab.pod("pod5").ipv4), pod("client1", lab.pod("pod1").ipv4)))
    assert len(lb.maps.skip) == 0


def test_bad_input_logs_and_counts_while_other_services_keep_working(lb: LbLab,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="accel.servicelb")
    good_vip = "10.96.0.16"
    pods = lb.lab.pod("pod3")
    lb.apply(add(
        service("good", (good_vip,)), eps("good-1", "good", lb.backends("pod3")),
        service("noselector", ("10.96.0.17",), selectorless=True),
        service("zero", ("10.96.0.18",), (ServicePort("http", "TCP", 0, 80),)),
        eps("wrongfam", "good", (ep(pods.ipv6),)),  # an IPv4 slice holding an IPv6 address
    ))
    assert lb.client("pod1", "tcp", good_vip, 80, 10)["names"] == Counter({"pod3": 10})
    assert lb.client("pod1", "tcp", "10.96.0.17", 80, 1)["errors"] == Counter({str(errno.ECONNREFUSED): 1})
    text = caplog.text
    for reason in ("service_without_selector", "service_port_invalid", "endpoint_address_family"):
        assert f"reason={reason}" in text
        assert (lb.metrics.registry.get_sample_value("meshaccel_bad_input_total", {"reason": reason}) or 0) >= 1
    assert lb.rec.matches_maps()


def test_one_change_is_a_handful_of_map_operations_at_2000_services(lb: LbLab) -> None:
    events: list[Event] = []
    for i in range(2000):
        name = f"bulk{i}"
        events += add(service(name, (f"10.96.{100 + i // 250}.{i % 250 + 1}",)),
                      eps(f"{name}-1", name, (ep(f"10.50.{i // 250}.{i % 250 + 1}"), ep(f"10.51.{i // 250}.1"))))
    lb.apply(events)
    assert len(lb.maps.services) >= 2000
    base = lb.rec.map_ops
    lb.apply([Event(EventType.MODIFIED, eps("bulk7-1", "bulk7", (ep("10.50.0.8"), ep("10.52.0.1"))))])
    assert lb.rec.map_ops - base == 3  # one membership delete, then one slot and one membership write
    base = lb.rec.map_ops
    lb.apply(add(service("bulk-new", ("10.96.99.1",)), eps("bulk-new-1", "bulk-new", (ep("10.53.0.1"),))))
    assert lb.rec.map_ops - base == 3  # slot, membership, entry
    base = lb.rec.map_ops
    lb.apply(delete(service("bulk-new", ("10.96.99.1",))))
    assert lb.rec.map_ops - base == 3
    lb.apply(delete(*(r.record for r in events)))
    assert lb.rec.matches_maps()


def test_agent_restart_adopts_the_maps_without_a_gap(lb: LbLab) -> None:
    vip = "10.96.0.19"
    svc, sl = service("adopt", (vip,)), eps("adopt-1", "adopt", lb.backends("pod2", "pod4"))
    lb.apply(add(svc, sl, service("stale", ("10.96.0.20",)), eps("stale-1", "stale", lb.backends("pod2"))))
    # A new agent: it adopts what is pinned and removes nothing until its first full sync, whose
    # model no longer has "stale" (deleted while the agent was down).
    state = ClusterState()
    rec = ServiceLBReconciler(NODE, lb.maps)
    rec.state = state
    state.subscribe(rec.on_change)
    before = dict(lb.maps.services.items())
    assert rec.adopt() == len(before)
    keep = [r for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE) for r in lb.state.records(kind).values()
            if r.name not in ("stale", "stale-1")]
    state.apply(add(*keep[: len(keep) // 2]))
    assert lb.client("pod1", "tcp", "10.96.0.20", 80, 2)["names"] == Counter({"pod2": 2})  # not synced yet
    state.apply(add(*keep[len(keep) // 2:]), synced=True)
    assert dict(lb.maps.services.items()) == {fe: e for fe, e in before.items() if fe.vip != "10.96.0.20"}
    assert set(lb.client("pod1", "tcp", vip, 80, 30)["names"]) == {"pod2", "pod4"}
    assert rec.matches_maps()
    lb.apply(delete(service("stale", ("10.96.0.20",))))  # the first reconciler catches up
    assert lb.rec.matches_maps()


def test_status_lists_the_lb_hooks(lb: LbLab) -> None:
    out = subprocess.run([sys.executable, "-m", "accel.cli", "status", "--instance", lb.lab.instance],
                         capture_output=True, text=True, check=True).stdout
    for hook in loader.SOCK_ADDR_HOOKS:
        assert f"cgroup_{hook}" in out
    assert "lb_services" in out and "lb_translated" in out


class WatchedTables:
    """Plain dicts as the LB maps, with a check run after every single map write or delete, i.e. at
    every instant a connect() could look: no slot that `count` covers is missing (the service never
    points at a freed slot), and a backend taken out of the service, once unreachable, never becomes
    reachable again within the change."""

    def __init__(self) -> None:
        self.gone: set[Backend] = set()
        self.unreachable: set[Backend] = set()
        self.steps = 0
        self.services: dict[Any, Any] = self._watched()
        self.slots: dict[Any, Any] = self._watched()
        self.members: dict[Any, Any] = self._watched()
        self.skip: dict[Any, Any] = {}
        self.service_cidrs: dict[Any, Any] = {}

    def _watched(self) -> dict[Any, Any]:
        tables = self

        class Watched(dict):  # type: ignore[type-arg]
            def __setitem__(self, k: Any, v: Any) -> None:
                super().__setitem__(k, v)
                tables.check()

            def __delitem__(self, k: Any) -> None:
                super().__delitem__(k)
                tables.check()

            def pop(self, k: Any, *default: Any) -> Any:
                v = super().pop(k, *default)
                tables.check()
                return v

        return Watched()

    def reachable(self) -> set[Backend]:
        out = set()
        for entry in self.services.values():
            for i in range(entry.count):
                b = self.slots.get((entry.id, i))
                assert b is not None, f"slot {entry.id}/{i} is covered by count but missing"
                out.add(b)
        return out

    def check(self) -> None:
        self.steps += 1
        reachable = self.reachable()
        back = reachable & self.unreachable
        assert not back, f"step {self.steps}: {back} reachable again"
        self.unreachable |= self.gone - reachable


@pytest.mark.parametrize("keep", [("10.50.0.1", "10.50.0.2"), ("10.50.0.2", "10.50.0.3"), ("10.50.0.3",), ()])
def test_every_single_map_write_leaves_the_service_consistent(keep: tuple[str, ...]) -> None:
    tables = WatchedTables()
    state = ClusterState()
    rec = ServiceLBReconciler(NODE, tables)
    rec.state = state
    state.subscribe(rec.on_change)
    ips = ("10.50.0.1", "10.50.0.2", "10.50.0.3", "10.50.0.4")
    state.apply(add(service("w", ("10.96.0.77",)), eps("w-1", "w", tuple(ep(ip) for ip in ips))), synced=True)
    tables.gone = {Backend(ip, PORT) for ip in ips if ip not in keep}
    state.apply([Event(EventType.MODIFIED, eps("w-1", "w", tuple(ep(ip) for ip in keep)))])
    assert tables.reachable() == {Backend(ip, PORT) for ip in keep}  # at the end, exactly what is kept
    assert tables.unreachable == tables.gone
