"""The flow store, its filters, the Istio metrics fed from it and the service map drawn from it."""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import orjson
import pytest

from accel.errors import UserError
from accel.flows import FilterError, FlowFilter, FlowStore, TooManySubscribers, flow_from_dict, flow_json
from accel.flows_map import build, render
from accel.flows_metrics import LABELS, IstioMetrics
from tests.flow_helpers import CART, DB, FRONT, at, flow, outside, pod

pytestmark = pytest.mark.unit


# --- the store ---------------------------------------------------------------------------------------

def test_store_keeps_exactly_the_last_n_flows() -> None:
    store = FlowStore(capacity=1000)
    sent = [flow(bytes_sent=i) for i in range(2500)]
    for f in sent:
        store.append(f)
    assert len(store) == 1000 and store.stats()["appended"] == 2500
    assert store.recent() == sent[-1000:]
    assert store.recent(limit=3) == sent[-3:]


def test_concurrent_producers_lose_nothing_and_keep_order_per_producer() -> None:
    store = FlowStore(capacity=100_000)
    per, producers = 5000, 4

    def produce(k: int) -> None:
        for i in range(per):
            store.append(flow(bytes_sent=k * per + i, cookie=k))

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = store.recent()
    assert len(kept) == per * producers
    for k in range(producers):
        mine = [f.bytes_sent for f in kept if f.cookie == k]
        assert mine == list(range(k * per, (k + 1) * per))


def test_filters_match_either_end_and_combine() -> None:
    now = time.time()
    fs = [
        flow(src=at(FRONT, 1111), dst=at(CART, 8080), service="shop/cart", service_port=80, time=now - 600),
        flow(src=at(CART, 2222), dst=at(DB, 5432), verdict="denied", reason="policy", event="refused", time=now - 30),
        flow(src=outside("192.0.2.7", 3333), dst=at(FRONT, 443), path="tunnel", encrypted=True, time=now),
    ]
    store = FlowStore(100)
    store.extend(fs)

    def q(**values: list[str]) -> list[int]:
        flt = FlowFilter.parse(values, now=now)
        return [fs.index(f) for f in store.recent(flt)]

    assert q(namespace=["data"]) == [1]
    assert q(namespace=["shop"]) == [0, 1, 2]  # either end
    assert q(pod=["shop/cart"]) == [0, 1]  # a name prefix: cart-0
    assert q(pod=["front"]) == [0, 2]  # any namespace
    assert q(pod=["data/front"]) == []
    assert q(identity=[DB.identity]) == [1]
    assert q(service=["shop/cart"]) == [0] and q(service=["cart"]) == [0] and q(service=["other/cart"]) == []
    assert q(verdict=["denied"]) == [1] and q(verdict=["FORWARDED"]) == [0, 2]
    assert q(port=["80"]) == [0] and q(port=["5432", "443"]) == [1, 2]  # service port; alternatives
    assert q(since=["5m"]) == [1, 2] and q(since=["10s"]) == [2]
    assert q(since=[str(now - 31)]) == [1, 2]
    assert q(namespace=["shop"], verdict=["forwarded"], since=["1m"]) == [2]  # AND across filters
    assert q(namespace=["nowhere"]) == []


@pytest.mark.parametrize(("name", "value", "says"), [
    ("verdict", "maybe", "--verdict 'maybe' is not one of forwarded, denied, refused"),
    ("port", "99999", "--port '99999' is not a port number"),
    ("port", "http", "--port 'http' is not a port number"),
    ("since", "yesterday", "--since 'yesterday' is not a duration"),
    ("pod", "a/b/c", "--pod 'a/b/c' is not [NAMESPACE/]NAME"),
    ("namespace", "Shop", "--namespace 'Shop' is not a namespace name"),
    ("identity", "shop/cart", "--identity 'shop/cart' is not a SPIFFE ID"),
    ("service", "a/b/c", "--service 'a/b/c' is not [NAMESPACE/]NAME"),
    ("colour", "red", "unknown filter 'colour'"),
])
def test_bad_filter_values_are_named(name: str, value: str, says: str) -> None:
    with pytest.raises(FilterError, match="^" + says.replace("[", r"\[").replace("]", r"\]")):
        FlowFilter.parse({name: [value]})


def test_since_reads_times() -> None:
    assert FlowFilter.parse({"since": ["2025-01-02T03:04:05Z"]}).since == 1735787045.0
    assert FlowFilter.parse({"since": ["2025-01-02T03:04:05"]}).since == 1735787045.0  # no zone: UTC
    assert FlowFilter.parse({"since": ["1h30m"]}, now=10_000.0).since == 10_000.0 - 5400


def test_filter_survives_the_query_string() -> None:
    flt = FlowFilter.parse({"pod": ["shop/front"], "port": ["80", "443"], "verdict": ["denied"], "since": ["5m"]})
    values: dict[str, list[str]] = {}
    for k, v in flt.query():
        values.setdefault(k, []).append(v)
    assert FlowFilter.parse(values) == flt


def test_flow_json_round_trip() -> None:
    f = flow(path="l7", http_method="GET", http_path="/a", http_status=503, response_flags="UH", bytes_exact=False)
    doc = orjson.loads(flow_json(f))
    assert doc["src"]["labels"] == {"app": "front", "version": "v1"} and doc["http_status"] == 503
    assert flow_from_dict(doc) == f
    doc["added_later"] = 1  # a newer agent's field: an older reader ignores it
    assert flow_from_dict(doc) == f
    with pytest.raises(ValueError, match="not a flow"):
        flow_from_dict({"time": 1.0})


# --- subscriptions -----------------------------------------------------------------------------------

def test_subscription_gets_matching_flows_after_its_backlog_without_gaps_or_repeats() -> None:
    store = FlowStore(1000)
    old = [flow(dst=at(DB, 5432)) for _ in range(5)]
    store.extend(old)
    store.extend(flow() for _ in range(3))  # not matching
    with store.subscribe(FlowFilter(namespaces=("data",)), backlog=3) as sub:
        new = [flow(dst=at(DB, 5432)) for _ in range(4)]
        store.extend([*new[:2], flow(), *new[2:]])
        got = sub.get(1.0)
        assert got == [*old[-3:], *new]
        assert sub.get(0.05) == []  # nothing more: a timeout, not an end
    assert store.stats()["subscribers"] == 0


def test_slow_subscriber_drops_and_counts_never_blocks_the_producer() -> None:
    store = FlowStore(100_000, queue_size=100)
    sub = store.subscribe()
    store.extend(flow() for _ in range(10_000))  # nobody reads: returns at once all the same
    assert len(store) == 10_000
    assert sub.dropped == 9_900
    assert len(sub.get(0) or []) == 100
    sub.close()
    assert store.stats()["subscriber_drops"] == 9_900


def test_subscribers_are_capped_and_closing_the_store_ends_them() -> None:
    store = FlowStore(10, max_subscribers=2)
    a, b = store.subscribe(), store.subscribe()
    with pytest.raises(TooManySubscribers):
        store.subscribe()
    waiting: list[object] = []
    t = threading.Thread(target=lambda: waiting.append(a.get(30)))
    t.start()
    store.close()
    t.join(5)
    assert waiting == [None] and b.get(0) is None  # ended, not timed out


def test_an_observer_bug_never_reaches_the_producer() -> None:
    store = FlowStore(10)
    seen: list[int] = []

    def bad(f: object) -> None:
        raise RuntimeError("bug")

    store.add_observer(bad)
    store.add_observer(lambda f: seen.append(1))
    store.extend([flow(), flow()])
    assert len(store) == 2 and seen == [1, 1] and store.stats()["observer_errors"] == 2


# --- Istio metrics -----------------------------------------------------------------------------------

def sample(m: IstioMetrics, name: str, **labels: str) -> float:
    """Sum of a counter's samples whose labels include `labels`."""
    total = 0.0
    for metric in m.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_istio_metrics_count_connections_bytes_and_requests_with_istios_labels() -> None:
    local = {FRONT.ip, CART.ip}
    m = IstioMetrics(lambda ep: ep.ip in local)
    conn = flow(event="open", service="shop/cart")
    m.observe(conn)
    m.observe(flow(src=conn.src, event="close", service="shop/cart", bytes_sent=1000, bytes_received=5000,
                   duration_seconds=1.5))
    m.observe(flow(dst=at(DB, 5432), path="tunnel", encrypted=True, event="close", bytes_sent=7, bytes_received=9))
    m.observe(flow(path="l7", source="envoy", http_method="GET", http_status=503, response_flags="UH",
                   service="shop/cart", verdict="refused", reason="no_backend"))
    # The kernel's flow of the connection into Envoy's L7 listener: Envoy counts its requests, not this.
    m.observe(flow(dst=outside("10.1.0.1", 15100), path="l7", service="shop/cart", bytes_sent=300))
    m.observe(flow(dst=at(DB, 5432), event="refused", verdict="denied", reason="policy"))
    m.observe(flow(proto="UDP", path="udp"))  # Istio has no UDP metrics

    # Same-node flow: reported by both ends, as sidecars on both would.
    both = dict(source_workload="front", destination_workload="cart", destination_service_name="cart")
    assert sample(m, "istio_tcp_connections_opened_total", reporter="source", **both) == 1
    assert sample(m, "istio_tcp_connections_opened_total", reporter="destination", **both) == 1
    assert sample(m, "istio_tcp_connections_closed_total", reporter="destination", **both) == 1
    # Istio names bytes from the server's side: received = request = the flow's bytes_sent.
    assert sample(m, "istio_tcp_received_bytes_total", reporter="destination", **both) == 1000
    assert sample(m, "istio_tcp_sent_bytes_total", reporter="destination", **both) == 5000
    labels = next(s.labels for metric in m.registry.collect() for s in metric.samples
                  if s.name == "istio_tcp_sent_bytes_total" and s.labels["reporter"] == "destination"
                  and s.labels["destination_workload"] == "cart")
    assert tuple(labels) == LABELS
    assert labels == {
        "reporter": "destination",
        "source_workload": "front", "source_canonical_service": "front", "source_canonical_revision": "v1",
        "source_workload_namespace": "shop", "source_principal": "spiffe://cluster.local/ns/shop/sa/front",
        "source_app": "front", "source_version": "v1", "source_cluster": "Kubernetes",
        "destination_service": "cart.shop.svc.cluster.local", "destination_service_namespace": "shop",
        "destination_service_name": "cart",
        "destination_workload": "cart", "destination_canonical_service": "cart",
        "destination_canonical_revision": "v1", "destination_workload_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/cart", "destination_app": "cart",
        "destination_version": "v1", "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "none",
    }
    # To a remote pod: only the source end is here.
    tunnel = dict(destination_workload="db", connection_security_policy="mutual_tls")
    assert sample(m, "istio_tcp_received_bytes_total", reporter="source", **tunnel) == 7
    assert sample(m, "istio_tcp_received_bytes_total", reporter="destination", **tunnel) == 0
    # L7: a request with its code and flags, no TCP counts.
    assert sample(m, "istio_requests_total", response_code="503", response_flags="UH", request_protocol="http",
                  reporter="destination") == 1
    assert sample(m, "istio_requests_total") == 2  # that one, by both ends; the kernel's connection is none
    assert sample(m, "istio_tcp_connections_closed_total", destination_service_name="cart") == 2  # the `both` one
    # Refused by policy: opened and closed at once, flag DENY (as ztunnel reports it).
    assert sample(m, "istio_tcp_connections_opened_total", response_flags="DENY", reporter="source") == 1
    assert sample(m, "istio_tcp_connections_closed_total", response_flags="DENY", reporter="source") == 1
    # No pod names or IPs in any label value.
    for metric in m.registry.collect():
        for s in metric.samples:
            assert not any(v.startswith("10.1.") or v.endswith("-0") for v in s.labels.values()), s


def test_unknown_ends_are_unknown_and_series_are_capped() -> None:
    m = IstioMetrics(max_series=3)
    m.observe(flow(src=outside("192.0.2.1"), dst=outside("192.0.2.2", 80)))
    assert sample(m, "istio_tcp_connections_closed_total", source_workload="unknown", destination_workload="unknown",
                  destination_service="unknown", source_principal="unknown") == 2  # both reporters
    for i in range(10):  # new workloads: new label sets, beyond the cap they are counted, not kept
        m.observe(flow(src=pod("shop", f"w{i}", "10.2.0.1")))
    assert m.series() == 3
    assert sample(m, "meshaccel_flow_metrics_dropped_total") > 0


# --- the service map ---------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def map_flows() -> list:  # type: ignore[type-arg]
    c = at(FRONT, 51000)
    return [
        flow(src=c, event="open"), flow(src=c, event="close", bytes_sent=1000, bytes_received=3000),  # 1 conn
        flow(event="close", bytes_sent=10, bytes_received=20),  # front -> cart: 2nd conn, plaintext
        flow(src=at(CART, 52000), dst=at(DB, 5432), path="tunnel", encrypted=True, bytes_sent=5, bytes_received=6),
        flow(src=at(CART, 52001), dst=at(DB, 5432), event="refused", verdict="denied", reason="policy"),
        flow(src=outside("192.0.2.9"), dst=at(FRONT, 443), path="l7", source="envoy", http_status=200,
             http_method="GET"),
        # the kernel's flow into Envoy's L7 listener: Envoy's request flow above draws that edge
        flow(src=outside("192.0.2.9"), dst=outside("10.1.0.1", 15100), path="l7"),
    ]


def test_service_map_svg_has_the_flows_nodes_and_edges(tmp_path: Path) -> None:
    out = tmp_path / "map.svg"
    m = render(map_flows(), out, title="test")
    root = ET.parse(out).getroot()
    groups = {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("id")}
    nodes = {i.removeprefix("node:") for i in groups if i.startswith("node:")}
    assert nodes == {"shop/front", "shop/cart", "data/db", "192.0.2.9"}
    edges = {i.removeprefix("edge:"): g for i, g in groups.items() if i.startswith("edge:")}
    assert set(edges) == {"shop/front->shop/cart:plaintext", "shop/cart->data/db:encrypted",
                          "shop/cart->data/db:denied", "192.0.2.9->shop/front:plaintext"}

    def text(g: ET.Element) -> str:
        return " ".join(t.text or "" for t in g.iter(f"{SVG}text"))

    def stroke(g: ET.Element) -> tuple[str | None, str | None]:
        path = next(g.iter(f"{SVG}path"))
        return path.get("stroke"), path.get("stroke-dasharray")

    assert "2 conns" in text(edges["shop/front->shop/cart:plaintext"])
    assert "3.9 KiB" in text(edges["shop/front->shop/cart:plaintext"])  # 1000+3000+10+20 bytes
    assert "1 denied" in text(edges["shop/cart->data/db:denied"])
    assert "1 req" in text(edges["192.0.2.9->shop/front:plaintext"])
    # Three kinds, three looks; and each look is explained in the legend.
    looks = {k: stroke(edges[e]) for e, k in [("shop/cart->data/db:encrypted", "encrypted"),
                                                ("shop/front->shop/cart:plaintext", "plaintext"),
                                                ("shop/cart->data/db:denied", "denied")]}
    assert len(set(looks.values())) == 3
    for kind, look in looks.items():
        assert stroke(groups[f"legend:{kind}"]) == look
    assert len(m.edges) == 4 and m.flows == 6  # the kernel's flow into Envoy is not counted


def test_service_map_png_and_bad_names(tmp_path: Path) -> None:
    out = tmp_path / "map.png"
    render(map_flows(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(UserError, match=r"name the file \.svg or \.png"):
        render(map_flows(), tmp_path / "map.jpg")
    with pytest.raises(UserError, match="cannot write it"):
        render(map_flows(), tmp_path / "no" / "such" / "map.svg")


def test_map_counts_a_connection_once_across_its_events() -> None:
    c = at(FRONT, 51000)
    m = build([flow(src=c, event="open"), flow(src=c, event="close", bytes_sent=1)])
    [edge] = m.edges.values()
    assert edge.connections == 1 and edge.bytes == 1
