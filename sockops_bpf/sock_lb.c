/* sock_lb: socket-level service load balancing (kube-proxy's job, done once per connect()).
 *
 * connect4/6   TCP and connected UDP: a service address (cluster IP, port, protocol) becomes one of
 *              its backends before the socket ever sends a packet; no per-packet NAT, no conntrack.
 * sendmsg4/6   the same for unconnected UDP (DNS to the cluster DNS service).
 * recvmsg4/6   UDP replies: the backend's address is shown to the application as the service's.
 * getpeername4/6  the application sees the service address it asked for.
 *
 * The reverse direction uses lb_reverse, keyed by (socket cookie, backend): written at translation,
 * read by recvmsg/getpeername, evicted by LRU when sockets are long gone.
 * A service with no usable backend makes connect()/sendmsg() fail at once with ECONNREFUSED
 * (bpf_set_retval; a bare `return 0` would say EPERM); so does an address inside a service range
 * (lb_service_cidrs) that is no service, e.g. one just deleted. Namespaces in lb_skip (pods Istio
 * handles, pods labelled meshaccel.io/exclude) keep the service address. */

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif
#ifndef EACCES
#define EACCES 13 /* a policy denied it: distinct from ECONNREFUSED (no such service or backend) */
#endif

/* bcc declares bpf_get_socket_cookie as returning u32; the cookie is 64 bits. */
static __u64 (*lb_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

#define LB_PASS 0       /* not a service, or a client that keeps service addresses */
#define LB_TRANSLATED 1 /* *out holds the backend */
#define LB_REFUSE 2     /* a service with no usable backend */
#define LB_REFUSE_NO_SERVICE 3 /* an address of a service range that is no service */

/* Clients that keep service addresses (Istio needs the VIP; meshaccel.io/exclude). */
static __always_inline int lb_skipped(struct bpf_sock_addr *ctx, __u64 netns_cookie)
{
    struct lb_skip_key skey = {};
    skey.netns_cookie = netns_cookie;
    struct lb_skip_entry *skip = lb_skip.lookup(&skey);
    if (skip)
        lb_count(LB_CNT_SKIPPED);
    return skip != 0;
}

static __always_inline int lb_pick(struct bpf_sock_addr *ctx, struct lb_svc_key *key, struct lb_addr *out)
{
    __u64 netns_cookie = bpf_get_netns_cookie(ctx);
    struct lb_svc *svc = lb_services.lookup(key);
    if (!svc) {
        /* Not a service. Inside a service range it is one no more (deleted) or never was: refuse at
         * once rather than let the connection wander to the default route. */
        struct lb_cidr_key ck = {};
        ck.prefixlen = 128;
        __builtin_memcpy(&ck.ip, &key->vip, sizeof(ck.ip));
        __u32 *in_range = lb_service_cidrs.lookup(&ck);
        if (!in_range || lb_skipped(ctx, netns_cookie))
            return LB_PASS;
        lb_count(LB_CNT_NO_SERVICE);
        return LB_REFUSE_NO_SERVICE;
    }
    if (lb_skipped(ctx, netns_cookie))
        return LB_PASS;
    /* One read of the value: id, count and flags come from the same version of the entry. */
    __u32 id = svc->id;
    __u32 count = svc->count;
    __u32 flags = svc->flags;
    __u64 timeout_ns = (__u64)svc->affinity_timeout * 1000000000ULL;
    if (count == 0) {
        lb_count(LB_CNT_NO_BACKEND);
        return LB_REFUSE;
    }

    struct lb_affinity_key akey = {};
    __u64 now = 0;
    if (flags & LB_F_AFFINITY) {
        akey.netns_cookie = netns_cookie;
        akey.svc_id = id;
        now = bpf_ktime_get_ns();
        struct lb_affinity_entry *a = lb_affinity.lookup(&akey);
        if (a && now - a->last_ns < timeout_ns) {
            /* Honour it only while that backend still serves this frontend. */
            struct lb_member_key m = {};
            m.svc_id = id;
            m.port = a->backend.port;
            __builtin_memcpy(&m.ip, &a->backend.ip, sizeof(m.ip));
            __u32 *member = lb_members.lookup(&m);
            if (member) {
                __builtin_memcpy(out, &a->backend, sizeof(*out));
                a->last_ns = now; /* kube-proxy's timeout counts from the last connection, too */
                lb_count(LB_CNT_AFFINITY_HIT);
                return LB_TRANSLATED;
            }
        }
    }

    struct lb_slot_key slot = {};
    slot.svc_id = id;
    slot.index = bpf_get_prandom_u32() % count;
    struct lb_addr *be = lb_slots.lookup(&slot);
    if (!be) {
        /* The agent lowered count and deleted this slot after we read count: slot 0 goes last. */
        lb_count(LB_CNT_SLOT_MISS);
        slot.index = 0;
        be = lb_slots.lookup(&slot);
        if (!be)
            return LB_REFUSE;
    }
    __builtin_memcpy(out, be, sizeof(*out));
    if (flags & LB_F_AFFINITY) {
        struct lb_affinity_entry e = {};
        __builtin_memcpy(&e.backend, be, sizeof(e.backend));
        e.last_ns = now;
        lb_affinity.update(&akey, &e);
    }
    return LB_TRANSLATED;
}

/* Remember which frontend this socket's backend stands for (recvmsg, getpeername). */
static __always_inline void lb_remember(void *ctx, struct lb_addr *be, struct lb_svc_key *key)
{
    struct lb_rev_key rk = {};
    rk.cookie = lb_socket_cookie(ctx);
    __builtin_memcpy(&rk.ip, &be->ip, sizeof(rk.ip));
    rk.port = be->port;
    struct lb_addr front = {};
    __builtin_memcpy(&front.ip, &key->vip, sizeof(front.ip));
    front.port = key->port;
    lb_reverse.update(&rk, &front);
}

static __always_inline struct lb_addr *lb_lookup_reverse(void *ctx, struct lb_rev_key *rk)
{
    rk->cookie = lb_socket_cookie(ctx);
    struct lb_addr *front = lb_reverse.lookup(rk);
    if (front)
        lb_count(LB_CNT_REVERSED);
    return front;
}

static __always_inline __u16 lb_port(struct bpf_sock_addr *ctx)
{
    return bpf_ntohs((__u16)CTX_U32(ctx->user_port));
}

/* Keep the destination for sockops (-> orig_dst -> SO_ORIGINAL_DST); false if the socket has no storage. */
static __always_inline int mesh_keep_capture_dst(struct bpf_sock_addr *ctx, struct lb_addr *dst)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 0;
    struct lb_addr *kept = capture_dst.sk_storage_get(sk, dst, BPF_SK_STORAGE_GET_F_CREATE);
    if (!kept)
        return 0;
    __builtin_memcpy(kept, dst, sizeof(*kept));
    mesh_count(MESH_CNT_CAPTURED);
    return 1;
}

/* A connect()/sendmsg() refused, as a flow (maps.h "Flows"). `front`: what the application asked for;
`dst`: the backend it would have reached (the service address itself when there was none). */
static __always_inline void flow_refused_at_connect(struct bpf_sock_addr *ctx, __u32 proto, struct local_pod *src,
                                                    struct lb_addr *dst, __u32 dst_identity,
                                                    struct lb_svc_key *front, __u8 reason, __u32 rule)
{
#if FLOW_EVENTS
    struct flow_event *e = flow_new(FLOW_REFUSED);
    if (!e)
        return;
    e->cookie = lb_socket_cookie(ctx);
    e->proto = (__u8)proto;
    e->reason = reason;
    e->rule = rule;
    e->src_identity = src ? src->identity : IDENTITY_HOST;
    if (src)
        __builtin_memcpy(&e->src, ip_is_v4(&dst->ip) ? &src->ip4 : &src->ip6, sizeof(e->src));
    __builtin_memcpy(&e->dst, &dst->ip, sizeof(e->dst));
    e->dport = dst->port;
    e->dst_identity = dst_identity;
    if (front) {
        __builtin_memcpy(&e->svc, &front->vip, sizeof(e->svc));
        e->svc_port = front->port;
    }
    flow_send(e);
#endif
}

static __always_inline struct local_pod *connecting_pod(struct bpf_sock_addr *ctx)
{
    struct local_pod_key pk = {};
    pk.netns_cookie = bpf_get_netns_cookie(ctx);
    return local_pods.lookup(&pk);
}

/* Refused by the service LB: no backend, or no such service in a service range. */
static __always_inline void lb_refused(struct bpf_sock_addr *ctx, __u32 proto, struct lb_svc_key *key, int r)
{
#if FLOW_EVENTS
    struct lb_addr front = {};
    __builtin_memcpy(&front.ip, &key->vip, sizeof(front.ip));
    front.port = key->port;
    flow_refused_at_connect(ctx, proto, connecting_pod(ctx), &front, IDENTITY_UNKNOWN, key,
                            r == LB_REFUSE ? FLOW_REASON_NO_BACKEND : FLOW_REASON_NO_SERVICE, 0);
#endif
}

/* Capture (maps.h "The mesh"): does this TCP connection go to the pod's capture listener? Only an
 * enrolled pod whose capture listener is up (POD_F_CAPTURE), only to an enrolled pod on another node:
 * same-node traffic keeps the kernel fast path, and a peer outside the mesh gets plaintext. A connection
 * to port 15008 is HBONE already (a waypoint's, a test client's): it is never wrapped twice. */
static __always_inline int mesh_wants_capture(struct local_pod *src, __u32 proto, struct lb_addr *dst,
                                              struct ipcache_entry *peer)
{
    if (proto != IPPROTO_TCP || dst->port == MESH_HBONE_PORT)
        return 0;
    if (!src || !(src->flags & POD_F_CAPTURE))
        return 0;
    return peer && (peer->flags & IPC_F_MTLS) && !(peer->flags & IPC_F_LOCAL);
}

/* Identity policy (maps.h "Identity policy"), after load balancing picked the backend: the client
 * pod's egress, and, when the backend lives on this node, the backend's ingress. Both ends are known
 * to the kernel here: the client by its network namespace (a process outside any pod is HOST), the
 * server by its address. Across nodes the receiving side decides its own ingress (ingress.c for
 * plaintext, the node Envoy's RBAC for HBONE). */
static __always_inline int policy_allows(struct local_pod *src, __u32 proto, struct lb_addr *dst,
                                         struct ipcache_entry *peer, __u32 *rule)
{
    __u32 src_id = src ? src->identity : IDENTITY_HOST;
    __u32 dst_id = peer ? peer->identity : IDENTITY_WORLD;
    /* A pod talking to itself: Kubernetes says no policy blocks it (and an identity cannot tell a pod from
     * its replicas). */
    if (src && (ip_equal(&src->ip4, &dst->ip) || ip_equal(&src->ip6, &dst->ip)))
        return 1;
    if (src && policy_verdict(src_id, dst_id, POL_EGRESS, (__u8)proto, dst->port, rule) == POL_DENY)
        return 0;
    if (peer && (peer->flags & IPC_F_LOCAL) &&
        policy_verdict(dst_id, src_id, POL_INGRESS, (__u8)proto, dst->port, rule) == POL_DENY)
        return 0;
    return 1;
}

/* What connect()/sendmsg() decided beyond the service LB. */
#define MESH_DIRECT 0
#define MESH_CAPTURE 1
#define MESH_DENY 2

static __always_inline int mesh_decide(struct bpf_sock_addr *ctx, __u32 proto, struct lb_addr *dst,
                                       struct lb_svc_key *front, int translated)
{
    struct local_pod *src = connecting_pod(ctx);
    struct ipcache_entry *peer = ipcache_of(&dst->ip);
    __u32 rule = 0;
    if (!policy_allows(src, proto, dst, peer, &rule)) {
        flow_refused_at_connect(ctx, proto, src, dst, peer ? peer->identity : IDENTITY_WORLD,
                                translated ? front : 0, FLOW_REASON_POLICY, rule);
        return MESH_DENY;
    }
    if (mesh_wants_capture(src, proto, dst, peer) && mesh_keep_capture_dst(ctx, dst))
        return MESH_CAPTURE;
    return MESH_DIRECT;
}

/* Forward translation for an IPv4 destination; 1 = let the call proceed, 0 = refuse it.
 * The destination is decided in this order: the service LB picks a backend (or refuses), then an
 * enrolled connection to another node is captured: sent to 127.0.0.1:15001 in the pod's own netns,
 * while getpeername() keeps showing what the application asked for. */
static __always_inline int lb_forward4(struct bpf_sock_addr *ctx, __u32 proto)
{
    struct lb_svc_key key = {};
    ip_from_v4(&key.vip, CTX_U32(ctx->user_ip4));
    key.port = lb_port(ctx);
    key.proto = (__u8)proto;
    struct lb_addr be = {};
    int r = lb_pick(ctx, &key, &be);
    if (r == LB_REFUSE || r == LB_REFUSE_NO_SERVICE) {
        lb_refused(ctx, proto, &key, r);
        bpf_set_retval(-ECONNREFUSED);
        return 0;
    }
    if (r == LB_PASS) {
        __builtin_memcpy(&be.ip, &key.vip, sizeof(be.ip));
        be.port = key.port;
    }
    int mesh = mesh_decide(ctx, proto, &be, &key, r == LB_TRANSLATED);
    if (mesh == MESH_DENY) {
        bpf_set_retval(-EACCES);
        return 0;
    }
    if (mesh == MESH_CAPTURE) {
        struct lb_addr cap = {};
        ip_from_v4(&cap.ip, bpf_htonl(0x7f000001)); /* 127.0.0.1 */
        cap.port = MESH_CAPTURE_PORT;
        ctx->user_ip4 = bpf_htonl(0x7f000001);
        ctx->user_port = (__u32)bpf_htons(MESH_CAPTURE_PORT);
        lb_remember(ctx, &cap, &key);
        if (r == LB_TRANSLATED)
            lb_count(LB_CNT_TRANSLATED);
        return 1;
    }
    if (r == LB_PASS)
        return 1;
    __u32 ip4;
    __builtin_memcpy(&ip4, &be.ip.addr[12], 4);
    ctx->user_ip4 = ip4;
    ctx->user_port = (__u32)bpf_htons(be.port);
    lb_remember(ctx, &be, &key);
    lb_count(LB_CNT_TRANSLATED);
    return 1;
}

static __always_inline void ctx_set_ip6(struct bpf_sock_addr *ctx, struct ip_addr *ip)
{
    __u32 w[4];
    __builtin_memcpy(w, ip->addr, 16);
    ctx->user_ip6[0] = w[0];
    ctx->user_ip6[1] = w[1];
    ctx->user_ip6[2] = w[2];
    ctx->user_ip6[3] = w[3];
}

static __always_inline int lb_forward6(struct bpf_sock_addr *ctx, __u32 proto)
{
    struct lb_svc_key key = {};
    ip_from_v6(&key.vip, CTX_U32(ctx->user_ip6[0]), CTX_U32(ctx->user_ip6[1]), CTX_U32(ctx->user_ip6[2]),
               CTX_U32(ctx->user_ip6[3]));
    key.port = lb_port(ctx);
    key.proto = (__u8)proto;
    struct lb_addr be = {};
    int r = lb_pick(ctx, &key, &be);
    if (r == LB_REFUSE || r == LB_REFUSE_NO_SERVICE) {
        lb_refused(ctx, proto, &key, r);
        bpf_set_retval(-ECONNREFUSED);
        return 0;
    }
    if (r == LB_PASS) {
        __builtin_memcpy(&be.ip, &key.vip, sizeof(be.ip));
        be.port = key.port;
    }
    int mesh = mesh_decide(ctx, proto, &be, &key, r == LB_TRANSLATED);
    if (mesh == MESH_DENY) {
        bpf_set_retval(-EACCES);
        return 0;
    }
    if (mesh == MESH_CAPTURE) {
        struct lb_addr cap = {};
        /* An IPv6 socket dialling an IPv4 pod (IPv4-mapped, as Java's sockets do) goes to the IPv4 listener
         * (::ffff:127.0.0.1): Envoy's SO_ORIGINAL_DST, so the CONNECT's authority, is then the pod's IPv4
         * address, which is what the far side serves, not ::ffff:a.b.c.d. */
        if (ip_is_v4(&be.ip))
            ip_from_v4(&cap.ip, bpf_htonl(0x7f000001));
        else
            cap.ip.addr[15] = 1; /* ::1 */
        cap.port = MESH_CAPTURE_PORT;
        ctx_set_ip6(ctx, &cap.ip);
        ctx->user_port = (__u32)bpf_htons(MESH_CAPTURE_PORT);
        lb_remember(ctx, &cap, &key);
        if (r == LB_TRANSLATED)
            lb_count(LB_CNT_TRANSLATED);
        return 1;
    }
    if (r == LB_PASS)
        return 1;
    ctx_set_ip6(ctx, &be.ip);
    ctx->user_port = (__u32)bpf_htons(be.port);
    lb_remember(ctx, &be, &key);
    lb_count(LB_CNT_TRANSLATED);
    return 1;
}

/* Reverse translation: the peer address the kernel is about to hand out becomes the service's. */
static __always_inline void lb_reverse4(struct bpf_sock_addr *ctx)
{
    struct lb_rev_key rk = {};
    ip_from_v4(&rk.ip, CTX_U32(ctx->user_ip4));
    rk.port = lb_port(ctx);
    struct lb_addr *front = lb_lookup_reverse(ctx, &rk);
    if (!front)
        return;
    __u32 ip4;
    __builtin_memcpy(&ip4, &front->ip.addr[12], 4);
    ctx->user_ip4 = ip4;
    ctx->user_port = (__u32)bpf_htons(front->port);
}

static __always_inline void lb_reverse6(struct bpf_sock_addr *ctx)
{
    struct lb_rev_key rk = {};
    ip_from_v6(&rk.ip, CTX_U32(ctx->user_ip6[0]), CTX_U32(ctx->user_ip6[1]), CTX_U32(ctx->user_ip6[2]),
               CTX_U32(ctx->user_ip6[3]));
    rk.port = lb_port(ctx);
    struct lb_addr *front = lb_lookup_reverse(ctx, &rk);
    if (!front)
        return;
    ctx_set_ip6(ctx, &front->ip);
    ctx->user_port = (__u32)bpf_htons(front->port);
}

static __always_inline __u32 lb_proto(struct bpf_sock_addr *ctx)
{
    __u32 proto = CTX_U32(ctx->protocol);
    return (proto == IPPROTO_TCP || proto == IPPROTO_UDP) ? proto : 0;
}

int lb_connect4(struct bpf_sock_addr *ctx)
{
    __u32 proto = lb_proto(ctx);
    return proto ? lb_forward4(ctx, proto) : 1;
}

int lb_connect6(struct bpf_sock_addr *ctx)
{
    __u32 proto = lb_proto(ctx);
    return proto ? lb_forward6(ctx, proto) : 1;
}

int lb_sendmsg4(struct bpf_sock_addr *ctx)
{
    return lb_forward4(ctx, IPPROTO_UDP);
}

int lb_sendmsg6(struct bpf_sock_addr *ctx)
{
    return lb_forward6(ctx, IPPROTO_UDP);
}

int lb_recvmsg4(struct bpf_sock_addr *ctx)
{
    lb_reverse4(ctx);
    return 1;
}

int lb_recvmsg6(struct bpf_sock_addr *ctx)
{
    lb_reverse6(ctx);
    return 1;
}

int lb_getpeername4(struct bpf_sock_addr *ctx)
{
    lb_reverse4(ctx);
    return 1;
}

int lb_getpeername6(struct bpf_sock_addr *ctx)
{
    lb_reverse6(ctx);
    return 1;
}
