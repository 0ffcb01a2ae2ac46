"""Identity-based L4 policy: Kubernetes NetworkPolicy and the L4 subset of Istio AuthorizationPolicy
compiled into the entries of the kernel's policy map and ipcache (POLICY.md)."""
