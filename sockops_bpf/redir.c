/* sk_msg: runs on sendmsg() of a socket in sock_hash and hands the bytes to the peer socket's
 * receive queue (BPF_F_INGRESS), skipping TCP/IP, qdisc and veth on both sides.
 *
 * The verdict is cached for the next REDIRECT_APPLY_BYTES bytes (bpf_msg_apply_bytes), so a
 * stream pays for this program once per that many bytes instead of once per sendmsg(); each verdict
 * takes that many bytes from the splice budget (maps.h).
 * When the peer is not in sock_hash (not local, gone, or not yet inserted because its side of the
 * handshake is still in flight), the verdict is "pass" and the socket is marked tcp_only: once a
 * connection has sent bytes through TCP it keeps doing so, because the receiver reads redirected
 * bytes before TCP ones and mixing the two paths could reorder the stream. */

#ifndef REDIRECT_APPLY_BYTES
#define REDIRECT_APPLY_BYTES 1048576 /* 1 MiB */
#endif

/* Mark the socket tcp_only (it stays on TCP for good), count why, and let this send go by TCP. */
static __always_inline int to_tcp_for_good(struct bpf_sock *sk, int why)
{
    __u8 one = 1;
    __u8 *mark = tcp_only.sk_storage_get(sk, &one, BPF_SK_STORAGE_GET_F_CREATE);
    if (mark)
        *mark = 1;
    count(why, 1);
    return SK_PASS;
}

int mesh_redir(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    if (REDIRECT_APPLY_BYTES)
        bpf_msg_apply_bytes(msg, REDIRECT_APPLY_BYTES);
    /* Once a socket missed its peer it stays on TCP for good (mixing paths could reorder its stream). */
    if (tcp_only.sk_storage_get(sk, 0, 0))
        return SK_PASS;
    /* A proxy leg that sends bulk goes to TCP for good, where the proxy's flow control can make it wait
     * (maps.h); by then it has spliced about one verdict's worth (a MiB) since its last pause. */
    __u64 *last = proxy_leg.sk_storage_get(sk, 0, 0);
    if (last) {
        __u64 now = bpf_ktime_get_ns();
        if (*last && now - *last < PROXY_LEG_BULK_NS)
            return to_tcp_for_good(sk, CNT_PROXY_BULK_TO_TCP);
        *last = now;
    }
    if (!splice_budget_take(REDIRECT_APPLY_BYTES))
        return to_tcp_for_good(sk, CNT_GUARD_TO_TCP);

    struct sock_key peer;
    __builtin_memset(&peer, 0, sizeof(peer));
    /* The peer's own key is ours mirrored: its src is our dst. */
    if (msg->family == AF_INET) {
        ip_from_v4(&peer.src_ip, msg->remote_ip4);
        ip_from_v4(&peer.dst_ip, msg->local_ip4);
    } else if (msg->family == AF_INET6) {
        ip_from_v6(&peer.src_ip, CTX_U32(msg->remote_ip6[0]), CTX_U32(msg->remote_ip6[1]), CTX_U32(msg->remote_ip6[2]),
                   CTX_U32(msg->remote_ip6[3]));
        ip_from_v6(&peer.dst_ip, CTX_U32(msg->local_ip6[0]), CTX_U32(msg->local_ip6[1]), CTX_U32(msg->local_ip6[2]),
                   CTX_U32(msg->local_ip6[3]));
    } else {
        return SK_PASS;
    }
    peer.src_port = (__u16)bpf_ntohl(msg->remote_port);
    peer.dst_port = (__u16)msg->local_port;

    struct endpoint_info *ep = local_endpoints.lookup(&peer.src_ip);
    if (ep && (ep->flags & EP_F_LOOPBACK))
        peer.netns_cookie = bpf_get_netns_cookie(msg);

    int verdict = sock_hash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        count(CNT_REDIRECT_VERDICTS, 1);
        count(CNT_VERDICT_BYTES, msg->size);
#if FLOW_EVENTS
        struct flow_state *st = flow_state.sk_storage_get(sk, 0, 0);
        if (st)
            st->spliced_bytes += msg->size; /* a lower bound: this verdict covers the next REDIRECT_APPLY_BYTES */
#endif
        return SK_PASS;
    }
    return to_tcp_for_good(sk, CNT_FALLBACKS);
}
