/* getsockopt: answer SO_ORIGINAL_DST for the Envoy end of a captured connection (sock_lb.c,
 * sockops.c), so Envoy's standard original_dst listener filter learns where the application meant
 * to go without iptables or conntrack.
 *
 * The kernel's own handler (netfilter's, when loaded) runs first and fails for these sockets; this
 * program then fills the answer and clears the error. Every other getsockopt passes untouched. */

#ifndef SOL_IP
#define SOL_IP 0
#endif
#ifndef SOL_IPV6
#define SOL_IPV6 41
#endif
#define SO_ORIGINAL_DST 80 /* netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number */

int mesh_getsockopt(struct bpf_sockopt *ctx)
{
    int level = ctx->level;
    if (ctx->optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6))
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct orig_dst_key k = {};
    k.netns_cookie = bpf_get_netns_cookie(ctx);
    __u32 family = sk->family;
    if (family == AF_INET) {
        ip_from_v4(&k.ip, sk->dst_ip4);
    } else if (family == AF_INET6) {
        ip_from_v6(&k.ip, sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3]);
    } else {
        return 1;
    }
    k.port = bpf_ntohs(sk->dst_port);
    struct lb_addr *dst = orig_dst.lookup(&k);
    if (!dst) {
        mesh_count(MESH_CNT_ORIG_DST_MISSED);
        return 1;
    }
    void *optval = ctx->optval;
    void *end = ctx->optval_end;
    if (level == SOL_IP) {
        struct sockaddr_in *sin = optval;
        if ((void *)(sin + 1) > end)
            return 1;
        sin->sin_family = AF_INET;
        sin->sin_port = bpf_htons(dst->port);
        __builtin_memcpy(&sin->sin_addr.s_addr, &dst->ip.addr[12], 4);
        __builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
        ctx->optlen = sizeof(*sin);
    } else {
        struct sockaddr_in6 *sin6 = optval;
        if ((void *)(sin6 + 1) > end)
            return 1;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = bpf_htons(dst->port);
        sin6->sin6_flowinfo = 0;
        __builtin_memcpy(&sin6->sin6_addr, dst->ip.addr, 16);
        sin6->sin6_scope_id = 0;
        ctx->optlen = sizeof(*sin6);
    }
    ctx->retval = 0;
    mesh_count(MESH_CNT_ORIG_DST_ANSWERED);
    return 1;
}
