"""Flows for tests: a few workloads and a factory with sensible defaults."""

from __future__ import annotations

import itertools
import time
from types import MappingProxyType
from typing import Any

from accel.flows import Endpoint, Flow

_ports = itertools.count(40000)


def pod(ns: str, workload: str, ip: str, port: int = 0, sa: str = "", version: str = "v1", pod_name: str = "") -> Endpoint:
    return Endpoint(ip, port or next(_ports), pod=f"{ns}/{pod_name or workload + '-0'}", workload=workload,
                    namespace=ns, identity=f"spiffe://cluster.local/ns/{ns}/sa/{sa or workload}",
                    labels=MappingProxyType({"app": workload, "version": version}))


def at(ep: Endpoint, port: int) -> Endpoint:
    return Endpoint(ep.ip, port, ep.pod, ep.workload, ep.namespace, ep.identity, ep.labels)


def outside(ip: str, port: int = 0) -> Endpoint:
    return Endpoint(ip, port or next(_ports))


FRONT = pod("shop", "front", "10.1.0.10")
CART = pod("shop", "cart", "10.1.0.11")
DB = pod("data", "db", "10.1.0.12")


def flow(src: Endpoint | None = None, dst: Endpoint | None = None, **kw: Any) -> Flow:
    """Front (a fresh ephemeral port) -> cart:8080, closed, spliced, forwarded unless told otherwise."""
    defaults: dict[str, Any] = dict(time=time.time(), event="close", source="kernel", proto="TCP",
                                    path="spliced", encrypted=False, verdict="forwarded")
    defaults.update(kw)
    return Flow(src=src or at(FRONT, next(_ports)), dst=dst or at(CART, 8080), **defaults)
