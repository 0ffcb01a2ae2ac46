/* sockops: put established TCP sockets whose two ends both live on this node into sock_hash, so
 * that redir.c can splice their bytes straight into the peer socket; file captured connections'
 * original destinations; report flows (maps.h "Flows").
 *
 * ACTIVE/PASSIVE_ESTABLISHED are handled, and STATE_CB only for the sockets whose flow is reported:
 * state changes are a handful per connection. RTT or per-packet callbacks are never asked for (they would
 * run this program on every packet). Sockets leave sock_hash by themselves when they close. */

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

/* A connection of a pod of this node opened (maps.h "Flows"): remember its flow on the socket, ask for
 * its state changes, and report it. The client's socket reports; a server's only when its client is
 * elsewhere. A pod's own loopback and HBONE's legs are not flows of their own. */
static __always_inline void flow_opened(struct bpf_sock_ops *skops, struct sock_key *key, int spliced)
{
#if FLOW_EVENTS
    if (key->src_port == MESH_HBONE_PORT || key->dst_port == MESH_HBONE_PORT)
        return;
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return;
    struct local_pod_key pk = {};
    pk.netns_cookie = bpf_get_netns_cookie(skops);
    struct local_pod *pod = local_pods.lookup(&pk);
    if (!pod)
        return; /* not a pod's socket: the host's, the node Envoy's own */
    int client = skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    struct ipcache_entry *peer = 0;
    if (ip_is_loopback(&key->dst_ip))
        return; /* within the pod, or the node Envoy's end of a capture leg */
    if (client) {
        if (capture_dst.sk_storage_get(sk, 0, 0))
            return; /* a tunnel: the node Envoy reports it, with exact bytes and both certificates' identities */
    } else {
        peer = ipcache_of(&key->dst_ip);
        if (peer && (peer->flags & (IPC_F_LOCAL | IPC_F_HOST)))
            return; /* a client of this node: its own socket reported it */
    }
    struct flow_state *st = flow_state.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return;
    __builtin_memset(st, 0, sizeof(*st));
    st->start_ns = bpf_ktime_get_ns();
    st->client = (__u8)client;
    st->spliced = (__u8)spliced;
    if (client) {
        __builtin_memcpy(&st->src, &key->src_ip, sizeof(st->src));
        st->sport = key->src_port;
        st->src_identity = pod->identity;
        __builtin_memcpy(&st->dst, &key->dst_ip, sizeof(st->dst));
        st->dport = key->dst_port;
        struct ipcache_entry *server = ipcache_of(&st->dst);
        st->dst_identity = server ? server->identity : IDENTITY_WORLD;
        st->path = spliced ? FLOW_PATH_SPLICED : FLOW_PATH_TCP;
        struct lb_rev_key rk = {};
        rk.cookie = bpf_get_socket_cookie(skops);
        __builtin_memcpy(&rk.ip, &key->dst_ip, sizeof(rk.ip));
        rk.port = key->dst_port;
        struct lb_addr *front = lb_reverse.lookup(&rk);
        if (front) {
            __builtin_memcpy(&st->svc, &front->ip, sizeof(st->svc));
            st->svc_port = front->port;
        }
    } else {
        __builtin_memcpy(&st->src, &key->dst_ip, sizeof(st->src));
        st->sport = key->dst_port;
        st->src_identity = peer ? peer->identity : IDENTITY_WORLD;
        __builtin_memcpy(&st->dst, &key->src_ip, sizeof(st->dst));
        st->dport = key->src_port;
        st->dst_identity = pod->identity;
        st->path = FLOW_PATH_TCP;
    }
    bpf_sock_ops_cb_flags_set(skops, CTX_U32(skops->bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG);
    struct flow_event *e = flow_new(FLOW_OPEN);
    if (!e)
        return;
    e->cookie = bpf_get_socket_cookie(skops);
    e->proto = IPPROTO_TCP;
    e->path = st->path;
    __builtin_memcpy(&e->src, &st->src, sizeof(e->src));
    __builtin_memcpy(&e->dst, &st->dst, sizeof(e->dst));
    __builtin_memcpy(&e->svc, &st->svc, sizeof(e->svc));
    e->sport = st->sport;
    e->dport = st->dport;
    e->svc_port = st->svc_port;
    e->src_identity = st->src_identity;
    e->dst_identity = st->dst_identity;
    flow_send(e);
#endif
}

/* A reported socket closed: its flow with bytes each way and duration. TCP's counters include sequence
 * space that carries no data, found by measuring: bytes_acked counts the client's own SYN and each
 * side's own FIN once acked, bytes_received the peer's FIN. `old_state` (the state the socket left for
 * CLOSE) tells which FINs went: after FIN_WAIT2, CLOSING or LAST_ACK both did; after CLOSE_WAIT only the
 * peer's. So the counts are exact payload for a connection that closed with FINs. */
static __always_inline void flow_closed(struct bpf_sock_ops *skops, __u32 old_state)
{
#if FLOW_EVENTS
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return;
    struct flow_state *st = flow_state.sk_storage_get(sk, 0, 0);
    if (!st)
        return;
    struct flow_event *e = flow_new(FLOW_CLOSE);
    if (!e)
        return;
    e->cookie = bpf_get_socket_cookie(skops);
    e->proto = IPPROTO_TCP;
    e->path = st->path;
    __builtin_memcpy(&e->src, &st->src, sizeof(e->src));
    __builtin_memcpy(&e->dst, &st->dst, sizeof(e->dst));
    __builtin_memcpy(&e->svc, &st->svc, sizeof(e->svc));
    e->sport = st->sport;
    e->dport = st->dport;
    e->svc_port = st->svc_port;
    e->src_identity = st->src_identity;
    e->dst_identity = st->dst_identity;
    int own_fin = old_state == BPF_TCP_FIN_WAIT2 || old_state == BPF_TCP_CLOSING || old_state == BPF_TCP_LAST_ACK;
    int peer_fin = own_fin || old_state == BPF_TCP_CLOSE_WAIT;
    __u64 acked = skops->bytes_acked;
    __u64 overhead = (__u64)(st->client + own_fin);
    __u64 sent = (acked > overhead ? acked - overhead : 0) + st->spliced_bytes; /* what this socket sent */
    __u64 received = skops->bytes_received;
    if (peer_fin && received)
        received -= 1;
    e->bytes_sent = st->client ? sent : received;
    e->bytes_received = st->client ? received : sent;
    if (st->spliced)
        e->flags = FLOW_F_BYTES_LOWER_BOUND;
    e->duration_ns = e->time_ns - st->start_ns;
    flow_send(e);
    flow_state.sk_storage_delete(sk);
#endif
}

int mesh_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_STATE_CB) {
        if (CTX_U32(skops->args[1]) == BPF_TCP_CLOSE)
            flow_closed(skops, CTX_U32(skops->args[0]));
        return 1;
    }
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;

    struct sock_key key;
    if (key_from_sockops(skops, &key) < 0)
        return 1;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        file_capture(skops, &key);

    /* Both ends must be endpoints on this node; anything else keeps the normal path. */
    int spliced = 0;
    struct endpoint_info *src = local_endpoints.lookup(&key.src_ip);
    struct endpoint_info *dst = local_endpoints.lookup(&key.dst_ip);
    if (src && dst && splice_budget_spent()) {
        count(CNT_GUARD_NOT_SPLICED, 1);
    } else if (src && dst) {
        struct sock_key hk = {};
        __builtin_memcpy(&hk, &key, sizeof(hk));
        if ((src->flags | dst->flags) & EP_F_LOOPBACK)
            hk.netns_cookie = bpf_get_netns_cookie(skops);
        /* bcc rewrites table methods as statements, so the result goes through a variable. */
        int err = sock_hash.sock_hash_update(skops, &hk, BPF_NOEXIST);
        if (err == 0) {
            count(CNT_SOCKETS_INSERTED, 1);
            spliced = 1;
            /* A proxy leg (maps.h): the node Envoy's capture leg (loopback, MESH_CAPTURE_PORT), or a host
             * address at one end (Envoy's delivery and L7 legs, kubelet probes). Spliced until it sends bulk. */
            int capture_leg = (key.src_port == MESH_CAPTURE_PORT || key.dst_port == MESH_CAPTURE_PORT) &&
                              ip_is_loopback(&key.dst_ip);
            struct bpf_sock *sk = skops->sk;
            if (sk && (capture_leg || src->identity == IDENTITY_HOST || dst->identity == IDENTITY_HOST)) {
                __u64 zero_ns = 0;
                proxy_leg.sk_storage_get(sk, &zero_ns, BPF_SK_STORAGE_GET_F_CREATE);
            }
        } else {
            count(CNT_INSERT_ERRORS, 1);
        }
    }
    flow_opened(skops, &key, spliced);
    return 1;
}
