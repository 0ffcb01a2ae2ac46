"""Pieces of the HBONE config that are plain functions: the port-range regex RBAC matches `:authority`
with, and how the compiler's tunnel verdicts become RBAC rules."""

from __future__ import annotations

import random
import re

import pytest

from accel.mesh_xds import port_rules
from accel.policy.rbac import InboundRbac, RbacPortRange
from accel.policy.types import Verdict
from meshxds.hbone import PortRule, connect_rbac, port_range_regex

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("lo,hi", [(0, 65535), (1, 1), (8080, 8080), (1000, 2000), (1, 1023), (1024, 65535),
                                   (99, 101), (9, 10), (0, 9), (123, 4567), (30000, 32767), (65535, 65535)])
def test_port_range_regex_matches_exactly_the_range(lo: int, hi: int) -> None:
    rx = re.compile(f"^(?:{port_range_regex(lo, hi)})$")
    wrong = [n for n in range(65536) if bool(rx.match(str(n))) != (lo <= n <= hi)]
    assert wrong == []
    assert not rx.match("08080") and not rx.match("")


def test_port_range_regex_random_ranges() -> None:
    rnd = random.Random(7)
    for _ in range(25):
        lo = rnd.randrange(65536)
        hi = rnd.randrange(lo, 65536)
        rx = re.compile(f"^(?:{port_range_regex(lo, hi)})$")
        assert all(bool(rx.match(str(n))) == (lo <= n <= hi) for n in range(0, 65536, 7))


def test_tunnel_verdicts_become_an_allow_list() -> None:
    web, ops = "spiffe://cluster.local/ns/a/sa/web", "spiffe://cluster.local/ns/a/sa/ops"
    rbac = InboundRbac(7, (
        RbacPortRange(0, 8079, (Verdict.DENY, 17), {}),
        RbacPortRange(8080, 8080, (Verdict.DENY, 17), {web: (Verdict.ALLOW, 16)}),
        RbacPortRange(8081, 65535, (Verdict.ALLOW, 0), {ops: (Verdict.DENY, 18)}),
    ))
    rules = port_rules(rbac)
    assert rules == (PortRule(0, 8079, False, ()), PortRule(8080, 8080, False, (web,)),
                     PortRule(8081, 65535, True, (ops,)))
    cfg = connect_rbac(rules)
    assert set(cfg.rules.policies) == {"ports-8080-8080", "ports-8081-65535"}  # nobody on 0..8079
    assert cfg.rules.policies["ports-8080-8080"].principals[0].authenticated.principal_name.exact == web
    assert cfg.rules.policies["ports-8081-65535"].principals[0].not_id.or_ids.ids[0].authenticated.principal_name.exact == ops
    assert port_rules(InboundRbac(7, ())) is None  # no policy: no RBAC at all
