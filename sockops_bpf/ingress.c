/* ingress (cgroup_skb): packets arriving for sockets of this node's pods from elsewhere. Two rules,
 * both decided before any socket of the application sees a byte:
 * - a strict pod accepts from outside its node only HBONE: port 15008, where the node Envoy's listener in
 *   the pod's namespace terminates mTLS; a plaintext SYN to any other port is dropped;
 * - identity policy (maps.h "Identity policy") for plaintext peers on other nodes, known by their address
 *   (ipcache). HBONE to 15008 is the node Envoy's to judge (RBAC on the peer's certificate).
 * Same-node peers were checked at connect() (the kernel knows them there) and this node's own addresses
 * (the node Envoy delivering tunnelled connections, kubelet probes) pass. Only a TCP connection's first
 * packet (SYN without ACK) is looked at, and each UDP datagram (connectionless: nothing else to hang a
 * verdict on), so established TCP traffic pays one header read. */

#define ETH_P_IP_BE 0x0008   /* htons(ETH_P_IP) as skb->protocol holds it on little-endian hosts */
#define ETH_P_IPV6_BE 0xDD86 /* htons(ETH_P_IPV6) */
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

struct l4_view {
    struct ip_addr src;
    struct ip_addr dst;
    __u16 sport;
    __u16 dport;
    __u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
    __u8 flags; /* TCP flags byte */
};

/* Fill `v` from a TCP or UDP packet; 0 when it is one, -1 for anything else (not looked at). */
static __always_inline int l4_view(struct __sk_buff *skb, struct l4_view *v)
{
    __u32 l4 = 0;
    __u32 eth = CTX_U32(skb->protocol);
    if (eth == ETH_P_IP_BE) {
        __u8 vihl;
        __u16 frag;
        __u32 saddr, daddr;
        if (bpf_skb_load_bytes(skb, 0, &vihl, 1) < 0 || bpf_skb_load_bytes(skb, 9, &v->proto, 1) < 0 ||
            bpf_skb_load_bytes(skb, 6, &frag, 2) < 0)
            return -1;
        if (bpf_ntohs(frag) & 0x1fff)
            return -1; /* a later fragment: its first one carried the ports */
        if (bpf_skb_load_bytes(skb, 12, &saddr, 4) < 0 || bpf_skb_load_bytes(skb, 16, &daddr, 4) < 0)
            return -1;
        ip_from_v4(&v->src, saddr);
        ip_from_v4(&v->dst, daddr);
        l4 = (vihl & 0x0f) * 4;
    } else if (eth == ETH_P_IPV6_BE) {
        if (bpf_skb_load_bytes(skb, 6, &v->proto, 1) < 0)
            return -1;
        if (bpf_skb_load_bytes(skb, 8, v->src.addr, 16) < 0 || bpf_skb_load_bytes(skb, 24, v->dst.addr, 16) < 0)
            return -1;
        l4 = 40;
    } else {
        return -1;
    }
    if (v->proto != IPPROTO_TCP && v->proto != IPPROTO_UDP)
        return -1;
    __u16 ports[2];
    if (bpf_skb_load_bytes(skb, l4, ports, 4) < 0)
        return -1;
    v->sport = bpf_ntohs(ports[0]);
    v->dport = bpf_ntohs(ports[1]);
    if (v->proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, l4 + 13, &v->flags, 1) < 0)
        return -1;
    return 0;
}

/* A packet refused here, as a flow (maps.h "Flows"). */
static __always_inline void flow_refused_here(struct l4_view *v, __u32 src_identity, __u32 dst_identity, __u8 reason,
                                              __u32 rule)
{
#if FLOW_EVENTS
    struct flow_event *e = flow_new(FLOW_REFUSED);
    if (!e)
        return;
    e->proto = v->proto;
    e->reason = reason;
    e->rule = rule;
    __builtin_memcpy(&e->src, &v->src, sizeof(e->src));
    __builtin_memcpy(&e->dst, &v->dst, sizeof(e->dst));
    e->sport = v->sport;
    e->dport = v->dport;
    e->src_identity = src_identity;
    e->dst_identity = dst_identity;
    flow_send(e);
#endif
}

int mesh_ingress(struct __sk_buff *skb)
{
    struct l4_view v = {};
    if (l4_view(skb, &v) < 0)
        return 1;
    if (v.proto == IPPROTO_TCP && (v.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
        return 1;
    struct ipcache_entry *dst = ipcache_of(&v.dst);
    if (!dst || !(dst->flags & IPC_F_LOCAL))
        return 1;
    struct ipcache_entry *src = ipcache_of(&v.src);
    if (src && (src->flags & (IPC_F_LOCAL | IPC_F_HOST)))
        return 1;
    if (v.proto == IPPROTO_TCP && v.dport == MESH_HBONE_PORT && (dst->flags & IPC_F_MTLS))
        return 1; /* HBONE: mTLS and the peer's certificate are the node Envoy's to check */
    __u32 src_id = src ? src->identity : IDENTITY_WORLD;
    if (v.proto == IPPROTO_TCP && (dst->flags & IPC_F_STRICT)) {
        mesh_count(MESH_CNT_STRICT_DROPPED);
        flow_refused_here(&v, src_id, dst->identity, FLOW_REASON_STRICT_PLAINTEXT, 0);
        return 0;
    }
    __u32 rule = 0;
    if (policy_verdict(dst->identity, src_id, POL_INGRESS, v.proto, v.dport, &rule) == POL_DENY) {
        flow_refused_here(&v, src_id, dst->identity, FLOW_REASON_POLICY, rule);
        return 0;
    }
    return 1;
}
