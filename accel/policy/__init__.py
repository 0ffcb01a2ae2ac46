"""Identity-based L4 policy: Kubernetes NetworkPolicy and the L4 subset of Istio AuthorizationPolicy
compiled into the entries of the kernel's policy map and ipcache (POLICY.md).

Modules: ports (port sets, prefixes), peers (identity facts, matchers, CIDR identities), rules (policy
records -> normalized rules), compiler (PolicyCompiler: incremental entries, diffs in write order),
evaluate (the kernel's lookup over entries), rbac (the HBONE inbound's policy by principal), types.
"""

from accel.policy.compiler import PolicyCompiler, PolicyOptions, policy_pod
from accel.policy.evaluate import check_connection, compile_all, evaluate, identity_of_address
from accel.policy.rbac import InboundRbac, RbacPortRange, inbound_rbac
from accel.policy.types import (
    Compiled,
    Direction,
    MapOp,
    PolicyDiff,
    PolicyKey,
    PolicyValue,
    Problem,
    RuleInfo,
    RuleRef,
    Verdict,
)

__all__ = [
    "Compiled", "Direction", "InboundRbac", "MapOp", "PolicyCompiler", "PolicyDiff", "PolicyKey", "PolicyOptions",
    "PolicyValue", "Problem", "RbacPortRange", "RuleInfo", "RuleRef", "Verdict", "check_connection", "compile_all",
    "evaluate", "identity_of_address", "inbound_rbac", "policy_pod",
]
