/* sk_msg: runs on sendmsg() of a socket in sock_hash and hands the bytes to the peer socket's
 * receive queue (BPF_F_INGRESS), skipping TCP/IP, qdisc and veth on both sides.
 *
 * The verdict is cached for the next REDIRECT_APPLY_BYTES bytes (bpf_msg_apply_bytes), so a
 * stream pays for this program once per that many bytes instead of once per sendmsg().
 * When the peer is not in sock_hash (it was set up before we attached, or is not local), the
 * verdict is "pass" and it is cached the same way: once a connection has sent bytes through TCP
 * it keeps doing so, because mixing the two paths could reorder its bytes at the receiver. */

#ifndef REDIRECT_APPLY_BYTES
#define REDIRECT_APPLY_BYTES 1073741824 /* 1 GiB */
#endif

int mesh_redir(struct sk_msg_md *msg)
{
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

    if (REDIRECT_APPLY_BYTES)
        bpf_msg_apply_bytes(msg, REDIRECT_APPLY_BYTES);
    int verdict = sock_hash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        count(CNT_REDIRECT_VERDICTS, 1);
        count(CNT_VERDICT_BYTES, msg->size);
    } else {
        count(CNT_FALLBACKS, 1);
    }
    return SK_PASS;
}
