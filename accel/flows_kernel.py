"""The kernel's flows: a thread reads the pinned ring buffer (maps.h "Flows"), turns each event into a
`Flow` (ends named from the model, the service from its ClusterIP, the denying rule from the policy
compiler's table) and hands them to the agent's flow store in batches.

The eBPF side never waits for us: when the buffer is full it drops the event and counts it
(flow_counters, shown in /metrics as meshaccel_flow_events_total{result="dropped"}).
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from accel.flows import Flow
from accel.flows_resolve import EndpointResolver
from sockops_bpf import libbpf
from sockops_bpf.layout import (
    FLOW_CLOSE,
    FLOW_F_BYTES_LOWER_BOUND,
    FLOW_OPEN,
    FLOW_PATH_SPLICED,
    FLOW_PATH_TCP,
    FLOW_PATH_TUNNEL,
    FLOW_PATH_UDP,
    FLOW_REASON_NO_BACKEND,
    FLOW_REASON_NO_SERVICE,
    FLOW_REASON_POLICY,
    FLOW_REASON_STRICT_PLAINTEXT,
    FLOW_REFUSED,
    FlowCounter,
    FlowEvent,
)
from sockops_bpf.maps import percpu_counters

log = logging.getLogger(__name__)

EVENTS = {FLOW_OPEN: "open", FLOW_CLOSE: "close", FLOW_REFUSED: "refused"}
PATHS = {FLOW_PATH_TCP: "tcp", FLOW_PATH_SPLICED: "spliced", FLOW_PATH_TUNNEL: "tunnel", FLOW_PATH_UDP: "udp"}
REASONS = {FLOW_REASON_NO_BACKEND: "no_backend", FLOW_REASON_NO_SERVICE: "no_service", FLOW_REASON_POLICY: "policy",
           FLOW_REASON_STRICT_PLAINTEXT: "strict_plaintext"}
PROTOS = {6: "TCP", 17: "UDP"}
# After a poll that found events, wait this long before the next: events then come in batches instead of one
# wakeup each (per event, the wakeup cost as much as the rest). The ring holds far more than this gathers.
BATCH_SECONDS = 0.01

_texts: dict[bytes, str] = {}


def _addr(ip: object) -> str:
    """An address of an event as text ("" when unset); cached: pods' addresses repeat, parsing them is a
    third of an event's cost."""
    raw = bytes(ip.addr)  # type: ignore[attr-defined]
    text = _texts.get(raw)
    if text is None:
        text = "" if not any(raw) else str(ip.to_ip())  # type: ignore[attr-defined]
        if len(_texts) > 65536:  # addresses churn slowly; start over rather than grow
            _texts.clear()
        _texts[raw] = text
    return text


class KernelFlows:
    """Reads `flow_events` of one pin folder until stopped. `record_many` is the flow store's;
    `l7_listeners()` the node Envoy's L7 listener addresses ("ip:port": a connection there is an L7 flow);
    `rule_name(index)` the policy rule table's name of a rule."""

    def __init__(self, pin_dir: Path, resolver: EndpointResolver, record_many: Callable[[Iterable[Flow]], None],
                 l7_listeners: Callable[[], set[str]] = set, rule_name: Callable[[int], str] = str) -> None:
        self.pin_dir = pin_dir
        self.resolver = resolver
        self.record_many = record_many
        self.l7_listeners = l7_listeners
        self.rule_name = rule_name
        self.read = 0
        self._batch: list[bytes] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._callback = libbpf.RingBufferCallback(self._on_sample)  # kept alive as long as the ring buffer
        # CLOCK_MONOTONIC (bpf_ktime_get_ns) to wall clock; refreshed on every poll round.
        self._mono_to_wall = time.time() - time.monotonic()

    def _on_sample(self, _ctx: int | None, data: int, size: int) -> int:
        self._batch.append(ct.string_at(data, min(size, ct.sizeof(FlowEvent))))
        return 0

    def start(self) -> None:
        fd = libbpf.obj_get(str(self.pin_dir / "flow_events"))
        try:
            rb = libbpf.ring_buffer_new(fd, self._callback)
        except OSError:
            os.close(fd)
            raise
        self._thread = threading.Thread(target=self._loop, args=(fd, rb), name="agent-kernel-flows", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self, fd: int, rb: int) -> None:
        try:
            while not self._stop.is_set():
                n = libbpf.ring_buffer_poll(rb, 200)
                if n < 0 and -n != 4:  # EINTR is fine
                    log.error("event=flow_ring_poll_failed error=%d", -n)
                    self._stop.wait(1.0)
                if self._batch:
                    batch, self._batch = self._batch, []
                    self._mono_to_wall = time.time() - time.monotonic()
                    try:
                        self.record_many([self.flow(FlowEvent.from_buffer_copy(b)) for b in batch])
                    except Exception:  # a bug must not stop the reader; logged, the next batch goes on
                        log.exception("event=kernel_flows_failed batch=%d", len(batch))
                    self.read += len(batch)
                    self._stop.wait(BATCH_SECONDS)
        finally:
            libbpf.ring_buffer_free(rb)
            os.close(fd)

    def flow(self, e: FlowEvent) -> Flow:
        src_ip, dst_ip, svc_ip = _addr(e.src), _addr(e.dst), _addr(e.svc)
        path = PATHS.get(int(e.path), "tcp")
        if f"{dst_ip}:{int(e.dport)}" in self.l7_listeners():
            path = "l7"  # the service LB sent it to the node Envoy's listener of an L7 service
        event = EVENTS.get(int(e.kind), "open")
        reason = REASONS.get(int(e.reason), "") if event == "refused" else ""
        verdict = "forwarded" if event != "refused" else ("denied" if reason in ("policy", "strict_plaintext")
                                                           else "refused")
        return Flow(
            time=e.time_ns / 1e9 + self._mono_to_wall,
            event=event,
            source="kernel",
            proto=PROTOS.get(int(e.proto), "TCP"),
            src=self.resolver.endpoint(src_ip, int(e.sport)),
            dst=self.resolver.endpoint(dst_ip, int(e.dport)),
            path=path,
            encrypted=path == "tunnel",
            verdict=verdict,
            reason=reason,
            policy=self.rule_name(int(e.rule)) if reason == "policy" else "",
            service=self.resolver.service_at(svc_ip, int(e.svc_port)) if svc_ip else "",
            service_ip=svc_ip,
            service_port=int(e.svc_port),
            cookie=int(e.cookie),
            bytes_sent=int(e.bytes_sent),
            bytes_received=int(e.bytes_received),
            bytes_exact=not (int(e.flags) & FLOW_F_BYTES_LOWER_BOUND),
            duration_seconds=e.duration_ns / 1e9,
        )

    def counters(self) -> dict[str, int]:
        """Events emitted and dropped (ring buffer full), summed over CPUs."""
        fd = libbpf.obj_get(str(self.pin_dir / "flow_counters"))
        try:
            return percpu_counters(fd, FlowCounter)
        finally:
            os.close(fd)
