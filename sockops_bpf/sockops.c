/* sockops: put established TCP sockets whose two ends both live on this node into sock_hash, so
 * that redir.c can splice their bytes straight into the peer socket.
 *
 * Only ACTIVE/PASSIVE_ESTABLISHED are handled and no extra callbacks are requested: asking for
 * state or RTT callbacks would run this program on every packet of every connection. Sockets leave
 * sock_hash by themselves when they close. */

static __always_inline int key_from_sockops(struct bpf_sock_ops *skops, struct sock_key *key)
{
    __builtin_memset(key, 0, sizeof(*key));
    if (skops->family == AF_INET) {
        ip_from_v4(&key->src_ip, skops->local_ip4);
        ip_from_v4(&key->dst_ip, skops->remote_ip4);
    } else if (skops->family == AF_INET6) {
        ip_from_v6(&key->src_ip, CTX_U32(skops->local_ip6[0]), CTX_U32(skops->local_ip6[1]), CTX_U32(skops->local_ip6[2]),
                   CTX_U32(skops->local_ip6[3]));
        ip_from_v6(&key->dst_ip, CTX_U32(skops->remote_ip6[0]), CTX_U32(skops->remote_ip6[1]), CTX_U32(skops->remote_ip6[2]),
                   CTX_U32(skops->remote_ip6[3]));
    } else {
        return -1;
    }
    key->src_port = (__u16)skops->local_port;
    key->dst_port = (__u16)bpf_ntohl(skops->remote_port);
    return 0;
}

/* A captured connection (sock_lb.c) is established: file its original destination under the client's
 * own address, which is what the accepted end (Envoy's) sees as its peer and asks SO_ORIGINAL_DST for.
 * Filed before the client's ACK goes out, so before Envoy can accept. */
static __always_inline void file_capture(struct bpf_sock_ops *skops, struct sock_key *key)
{
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return;
    struct lb_addr *dst = capture_dst.sk_storage_get(sk, 0, 0);
    if (!dst)
        return;
    struct orig_dst_key ok = {};
    ok.netns_cookie = bpf_get_netns_cookie(skops);
    __builtin_memcpy(&ok.ip, &key->src_ip, sizeof(ok.ip));
    ok.port = key->src_port;
    struct lb_addr d = {};
    __builtin_memcpy(&d, dst, sizeof(d));
    orig_dst.update(&ok, &d);
    mesh_count(MESH_CNT_ORIG_DST_FILED);
}

int mesh_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;

    struct sock_key key;
    if (key_from_sockops(skops, &key) < 0)
        return 1;
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        file_capture(skops, &key);

    /* Both ends must be endpoints on this node; anything else keeps the normal path. */
    struct endpoint_info *src = local_endpoints.lookup(&key.src_ip);
    if (!src)
        return 1;
    struct endpoint_info *dst = local_endpoints.lookup(&key.dst_ip);
    if (!dst)
        return 1;
    if ((src->flags | dst->flags) & EP_F_LOOPBACK)
        key.netns_cookie = bpf_get_netns_cookie(skops);

    /* bcc rewrites table methods as statements, so the result goes through a variable. */
    int err = sock_hash.sock_hash_update(skops, &key, BPF_NOEXIST);
    if (err == 0)
        count(CNT_SOCKETS_INSERTED, 1);
    else
        count(CNT_INSERT_ERRORS, 1);
    return 1;
}
