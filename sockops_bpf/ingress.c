/* ingress (cgroup_skb): packets arriving for sockets of this node's pods. Only the first packet of a
 * TCP connection (SYN without ACK) is looked at, so established traffic pays one header read.
 *
 * A strict pod accepts from outside its node only HBONE: port 15008, where the node Envoy's listener
 * in the pod's namespace terminates mTLS. A plaintext SYN from another node to any other port of a
 * strict pod is dropped here, before any socket of the application sees it. Same-node peers (the
 * kernel knows them: checked at connect()) and this node's own addresses (the node Envoy delivering
 * tunnelled connections, kubelet probes) pass. */

#define ETH_P_IP_BE 0x0008   /* htons(ETH_P_IP) as skb->protocol holds it on little-endian hosts */
#define ETH_P_IPV6_BE 0xDD86 /* htons(ETH_P_IPV6) */
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

struct l4_view {
    struct ip_addr src;
    struct ip_addr dst;
    __u16 dport;
    __u8 flags; /* TCP flags byte */
};

/* Fill `v` from a TCP packet; 0 when it is one, -1 for anything else (not looked at). */
static __always_inline int tcp_view(struct __sk_buff *skb, struct l4_view *v)
{
    __u32 l4 = 0;
    __u32 proto = CTX_U32(skb->protocol);
    if (proto == ETH_P_IP_BE) {
        __u8 vihl;
        __u8 ipproto;
        __u16 frag;
        __u32 saddr, daddr;
        if (bpf_skb_load_bytes(skb, 0, &vihl, 1) < 0 || bpf_skb_load_bytes(skb, 9, &ipproto, 1) < 0 ||
            bpf_skb_load_bytes(skb, 6, &frag, 2) < 0)
            return -1;
        if (ipproto != IPPROTO_TCP || (bpf_ntohs(frag) & 0x1fff))
            return -1;
        if (bpf_skb_load_bytes(skb, 12, &saddr, 4) < 0 || bpf_skb_load_bytes(skb, 16, &daddr, 4) < 0)
            return -1;
        ip_from_v4(&v->src, saddr);
        ip_from_v4(&v->dst, daddr);
        l4 = (vihl & 0x0f) * 4;
    } else if (proto == ETH_P_IPV6_BE) {
        __u8 nexthdr;
        if (bpf_skb_load_bytes(skb, 6, &nexthdr, 1) < 0 || nexthdr != IPPROTO_TCP)
            return -1;
        if (bpf_skb_load_bytes(skb, 8, v->src.addr, 16) < 0 || bpf_skb_load_bytes(skb, 24, v->dst.addr, 16) < 0)
            return -1;
        l4 = 40;
    } else {
        return -1;
    }
    __u16 dport;
    if (bpf_skb_load_bytes(skb, l4 + 2, &dport, 2) < 0 || bpf_skb_load_bytes(skb, l4 + 13, &v->flags, 1) < 0)
        return -1;
    v->dport = bpf_ntohs(dport);
    return 0;
}

int mesh_ingress(struct __sk_buff *skb)
{
    struct l4_view v = {};
    if (tcp_view(skb, &v) < 0)
        return 1;
    if ((v.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
        return 1;
    struct ipcache_entry *dst = ipcache_of(&v.dst);
    if (!dst || (dst->flags & (IPC_F_LOCAL | IPC_F_STRICT)) != (IPC_F_LOCAL | IPC_F_STRICT))
        return 1;
    if (v.dport == MESH_HBONE_PORT)
        return 1;
    struct ipcache_entry *src = ipcache_of(&v.src);
    if (src && (src->flags & (IPC_F_LOCAL | IPC_F_HOST)))
        return 1;
    mesh_count(MESH_CNT_STRICT_DROPPED);
    return 0;
}
