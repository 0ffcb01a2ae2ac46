"""The agent's Prometheus metrics, in one registry per agent (so tests can run several agents).
Names follow meshaccel_<thing>_<unit>_total; prometheus-client adds `_total` to counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.objects = Gauge("meshaccel_state_objects", "Objects in the state model, by kind", ["kind"], registry=r)
        self.events = Counter("meshaccel_source_events", "Object events received from the source",
                              ["kind", "type"], registry=r)
        self.source_ops = Counter("meshaccel_source_operations", "Source relists, reconnects and bookmarks",
                                  ["op", "kind"], registry=r)
        self.bad_input = Counter("meshaccel_bad_input", "Bad input seen (logged, a fallback applied)",
                                 ["reason"], registry=r)
        self.errors = Counter("meshaccel_errors", "Errors, by component and reason", ["component", "reason"],
                              registry=r)
        self.reconcile_seconds = Histogram(
            "meshaccel_reconcile_latency_seconds", "Time to apply one batch of events to the model and the maps",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.map_entries = Gauge("meshaccel_map_entries", "Entries in a BPF map, as the agent wrote them", ["map"],
                                 registry=r)
        self.map_updates = Counter("meshaccel_map_updates", "Writes to BPF maps", ["map", "op"], registry=r)
        self.revoked = Counter("meshaccel_policy_revoked_connections",
                               "Established connections closed because a policy change no longer allows them",
                               registry=r)
        self.ready = Gauge("meshaccel_ready", "1 once the first full sync is in the maps", registry=r)
        self.sync_lag = Gauge("meshaccel_sync_lag_seconds",
                              "Age of the oldest event waiting to be applied (0 when caught up)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
