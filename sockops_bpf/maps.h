/* Map layouts shared by every meshaccel eBPF program. The Python mirror is sockops_bpf/layout.py;
 * tests/test_layout.py keeps the two equal (sizes, offsets, and pin names, which carry each map's
 * layout version: see layout.py LAYOUT_VERSIONS for how an upgrade moves entries to a new layout). Addresses are always 16 bytes:
 * IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), so dual-stack needs no second set of maps.
 *
 * The loader compiles this header and the program files as one text: bcc rewrites map calls only
 * in the main text, not in included files.
 *
 * PIN_DIR is set by the loader (-DPIN_DIR="/sys/fs/bpf/meshaccel/<instance>"): maps are pinned there
 * and reused when they already exist, so a reload keeps established fast-path sockets. */
#ifndef MESHACCEL_MAPS_H
#define MESHACCEL_MAPS_H

/* MESHACCEL_LAYOUT_ONLY: just the types, for the host-compiled probe of tests/test_layout.py. */
#ifdef MESHACCEL_LAYOUT_ONLY
#include <linux/types.h>
#else
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#ifndef PIN_DIR
#error "PIN_DIR must be defined by the loader"
#endif
#endif

#define MAX_ENDPOINTS 65536
#define MAX_SOCKETS 131072

/* One IP address, IPv4-mapped when it is IPv4. */
struct ip_addr {
    __u8 addr[16];
};

/* A pod (or loopback) address that lives on this node, written by the agent. */
struct endpoint_info {
    __u32 identity; /* numeric workload identity; 0 = unknown */
    __u32 flags;    /* EP_F_* */
};
#define EP_F_LOOPBACK 1 /* loopback: the socket key then carries the netns cookie */

/* A TCP socket as seen from its own side: (src = local, dst = remote). Ports in host byte order.
 * netns_cookie is 0 except for loopback sockets, whose 4-tuple repeats in every pod's namespace. */
struct sock_key {
    struct ip_addr src_ip;
    struct ip_addr dst_ip;
    __u64 netns_cookie;
    __u16 src_port;
    __u16 dst_port;
    __u32 pad;
};

/* Per-CPU counters, indexed by enum counter. A redirect verdict covers the sendmsg() it ran on and
 * the next REDIRECT_APPLY_BYTES of that socket (redir.c), so VERDICT_BYTES counts only the bytes of the
 * sendmsg() calls that ran the program: a lower bound of the bytes spliced. */
enum counter {
    CNT_SOCKETS_INSERTED = 0,
    CNT_INSERT_ERRORS = 1,
    CNT_REDIRECT_VERDICTS = 2,
    CNT_VERDICT_BYTES = 3,
    CNT_FALLBACKS = 4,
    CNT_GUARD_TO_TCP = 5,      /* spliced sockets moved to TCP for good: the splice budget was spent */
    CNT_GUARD_NOT_SPLICED = 6, /* connections not spliced: the splice budget was spent */
    CNT_PROXY_BULK_TO_TCP = 7, /* legs into the node Envoy (or the host) moved to TCP for good: bulk (redir.c) */
    CNT_MAX = 8,
};

#ifndef MESHACCEL_LAYOUT_ONLY
BPF_TABLE_PINNED("hash", struct ip_addr, struct endpoint_info, local_endpoints, MAX_ENDPOINTS,
                 PIN_DIR "/local_endpoints");
/* bcc's BPF_SOCKHASH cannot be pinned and BPF_TABLE_PINNED lacks the sockhash methods: this is
 * BPF_SOCKHASH's table shape with a pinned section. */
struct sock_hash_table_t {
    struct sock_key key;
    int leaf;
    int (*update)(struct sock_key *, int *);
    int (*delete)(struct sock_key *);
    int (*sock_hash_update)(void *, void *, u64);
    int (*msg_redirect_hash)(void *, void *, u64);
    int (*sk_redirect_hash)(void *, void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/sockhash:" PIN_DIR "/sock_hash")))
struct sock_hash_table_t sock_hash = {.max_entries = MAX_SOCKETS};
BPF_ANNOTATE_KV_PAIR(sock_hash, struct sock_key, int);
BPF_TABLE_PINNED("percpu_array", int, __u64, counters, CNT_MAX, PIN_DIR "/counters");

/* Per-socket flag, set when a socket's sk_msg verdict fell back to TCP: it then stays on TCP (see
 * redir.c). Socket-local storage goes away with the socket. bcc's BPF_SK_STORAGE shape, pinned. */
struct tcp_only_table_t {
    int key;
    __u8 leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" PIN_DIR "/tcp_only")))
struct tcp_only_table_t tcp_only = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(tcp_only, int, __u8);

/* Per-socket state of a proxy leg: a spliced socket with the node Envoy (or another host process) at one
 * end (sockops.c). Such a leg is spliced for its small exchanges only: the proxy stops reading one side
 * while the other cannot take more, and only TCP then makes the writer wait (spliced bytes have no flow
 * control), so a bulk sender must be on TCP. `last_verdict_ns`: when the socket's sk_msg program last ran,
 * which it does once per REDIRECT_APPLY_BYTES (redir.c). bcc's BPF_SK_STORAGE shape, pinned. */
struct proxy_leg_table_t {
    int key;
    __u64 leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" PIN_DIR "/proxy_leg")))
struct proxy_leg_table_t proxy_leg = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(proxy_leg, int, __u64);
/* Two verdicts within this time (REDIRECT_APPLY_BYTES each: over 100 MB/s) make a proxy leg bulk. */
#define PROXY_LEG_BULK_NS 10000000ULL

/* The splice budget (accel/splice_guard.py). The kernel queues a spliced byte at its receiver with no
 * flow control: it charges the receiver and never makes the sender wait. A receiver slower than its
 * sender (a consumer that pauses; the node Envoy when the tunnel behind it is the bottleneck) lets that
 * queue grow until the node's TCP memory reaches the kernel's pressure mark, and then the sender's writes
 * fail with ENOMEM. So splicing spends a budget: each sk_msg verdict takes the bytes it covers, and a
 * watcher in user space (the agent, or an in-process lab) sets it every few milliseconds to what the node's
 * TCP memory has left under a mark. Out of budget, a spliced socket that sends moves to TCP for good (TCP's
 * window then makes it wait; its receiver reads what was spliced before what came by TCP, so nothing is
 * reordered) and no new connection is spliced. A watcher that stops refilling (starved, or gone) stops the
 * splicing within one budget. `guarded` 0 (no watcher ever ran) leaves splicing unbounded. */
struct splice_budget {
    __s64 credit; /* bytes that may still be spliced before the watcher looks again */
    __u32 guarded;
    __u32 pad;
};
BPF_TABLE_PINNED("array", int, struct splice_budget, splice_budget, 1, PIN_DIR "/splice_budget");

/* Take `bytes` from the budget; 0 when it is spent. */
static __always_inline int splice_budget_take(__s64 bytes)
{
    int zero = 0;
    struct splice_budget *b = splice_budget.lookup(&zero);
    if (!b || !b->guarded)
        return 1;
    if (b->credit < bytes)
        return 0;
    __sync_fetch_and_add(&b->credit, -bytes); /* racing takers may overdraw by a verdict each: bounded */
    return 1;
}

static __always_inline int splice_budget_spent(void)
{
    int zero = 0;
    struct splice_budget *b = splice_budget.lookup(&zero);
    return b && b->guarded && b->credit <= 0;
}

static __always_inline void count(int which, __u64 n)
{
    __u64 *v = counters.lookup(&which);
    if (v)
        *v += n; /* per-CPU slot: no atomic needed */
}

/* Context fields must be read 4 bytes at a time: clang would merge neighbouring u32 reads into
 * one u64 load, which the verifier refuses for context structures. */
#define CTX_U32(field) (*(volatile __u32 *)&(field))

/* Fill a 16-byte address from an IPv4 address in network byte order. */
static __always_inline void ip_from_v4(struct ip_addr *ip, __u32 v4)
{
    __builtin_memset(ip, 0, sizeof(*ip));
    ip->addr[10] = 0xff;
    ip->addr[11] = 0xff;
    __builtin_memcpy(&ip->addr[12], &v4, 4);
}

static __always_inline void ip_from_v6(struct ip_addr *ip, const __u32 w0, const __u32 w1, const __u32 w2,
                                       const __u32 w3)
{
    __u32 *p = (__u32 *)ip->addr;
    p[0] = w0;
    p[1] = w1;
    p[2] = w2;
    p[3] = w3;
}

#endif /* MESHACCEL_LAYOUT_ONLY */

/* ---- Service load balancing (sock_lb.c) ----------------------------------------------------------
 * A frontend is one (cluster IP, port, protocol) of a Service. Its backends sit in slots
 * (frontend id, 0..count-1); the agent writes a new slot before it raises `count` and lowers `count`
 * before it deletes a slot, and every write replaces one hash element whole (RCU), so a connect()
 * never sees a service with no backends while it has some, nor a slot that was freed under it.
 * Frontend ids are never reused while the agent runs, so a stale slot never belongs to another
 * service. Ports are in host byte order. */
#define LB_MAX_SERVICES 65536  /* frontends */
#define LB_MAX_SLOTS 262144    /* backend slots, all frontends together */
#define LB_MAX_BACKENDS 1024   /* slots of one frontend */
#define LB_MAX_REVERSE 131072  /* (socket, backend) -> frontend, for getpeername and UDP replies */
#define LB_MAX_AFFINITY 65536  /* (client netns, frontend) -> backend, sessionAffinity ClientIP */
#define LB_MAX_SKIP 16384      /* client network namespaces that keep the service address */
#define LB_MAX_CIDRS 64        /* service ranges: an address there that is no service is refused */

struct lb_svc_key {
    struct ip_addr vip;
    __u16 port;
    __u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
    __u8 pad;
};

struct lb_svc {
    __u32 id;               /* frontend id, never 0 */
    __u32 count;            /* usable slots; 0 = the service exists but has no backend: refuse */
    __u32 flags;            /* LB_F_* */
    __u32 affinity_timeout; /* seconds, with LB_F_AFFINITY */
};
#define LB_F_AFFINITY 1 /* sessionAffinity: ClientIP */

struct lb_slot_key {
    __u32 svc_id;
    __u32 index;
};

/* An address and port: a backend, or the frontend a backend answers for. */
struct lb_addr {
    struct ip_addr ip;
    __u16 port;
    __u16 pad;
    __u32 pad2;
};

/* (frontend, backend) membership, so an affinity entry is honoured only while its backend serves. */
struct lb_member_key {
    __u32 svc_id;
    __u16 port;
    __u16 pad;
    struct ip_addr ip;
};

struct lb_affinity_key {
    __u64 netns_cookie; /* the client: one pod = one network namespace (the host = one, too) */
    __u32 svc_id;
    __u32 pad;
};

struct lb_affinity_entry {
    struct lb_addr backend;
    __u64 last_ns; /* bpf_ktime_get_ns() of the last connection that used it */
};

struct lb_rev_key {
    __u64 cookie; /* socket cookie */
    struct ip_addr ip;
    __u16 port;
    __u16 pad;
    __u32 pad2;
};

struct lb_skip_key {
    __u64 netns_cookie;
};

struct lb_skip_entry {
    __u32 reason; /* LB_SKIP_*: why this namespace keeps service addresses (for status) */
    __u32 pad;
};
#define LB_SKIP_EXCLUDED 1 /* meshaccel.io/exclude */
#define LB_SKIP_ISTIO 2    /* Istio sidecar or ambient: Istio needs the VIP */

/* LPM trie key; IPv4 ranges are IPv4-mapped, so their prefixlen is 96 + the IPv4 one. */
struct lb_cidr_key {
    __u32 prefixlen;
    struct ip_addr ip;
};

enum lb_counter {
    LB_CNT_TRANSLATED = 0,  /* connect/sendmsg rewritten to a backend */
    LB_CNT_NO_BACKEND = 1,  /* refused: the service has no usable backend */
    LB_CNT_SKIPPED = 2,     /* a service address from a namespace in lb_skip */
    LB_CNT_AFFINITY_HIT = 3,
    LB_CNT_REVERSED = 4,    /* recvmsg/getpeername answers rewritten back to the service */
    LB_CNT_SLOT_MISS = 5,   /* a slot vanished under a reader (should stay 0) */
    LB_CNT_NO_SERVICE = 6,  /* refused: an address in a service range that is no service (e.g. deleted) */
    LB_CNT_MAX = 8,
};

#ifndef MESHACCEL_LAYOUT_ONLY
BPF_TABLE_PINNED7("hash", struct lb_svc_key, struct lb_svc, lb_services, LB_MAX_SERVICES,
                  PIN_DIR "/lb_services", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("hash", struct lb_slot_key, struct lb_addr, lb_slots, LB_MAX_SLOTS, PIN_DIR "/lb_slots",
                  BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("hash", struct lb_member_key, __u32, lb_members, LB_MAX_SLOTS, PIN_DIR "/lb_members",
                  BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct lb_rev_key, struct lb_addr, lb_reverse, LB_MAX_REVERSE, PIN_DIR "/lb_reverse");
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_entry, lb_affinity, LB_MAX_AFFINITY,
                 PIN_DIR "/lb_affinity");
BPF_TABLE_PINNED7("hash", struct lb_skip_key, struct lb_skip_entry, lb_skip, LB_MAX_SKIP, PIN_DIR "/lb_skip",
                  BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", int, __u64, lb_counters, LB_CNT_MAX, PIN_DIR "/lb_counters");
BPF_TABLE_PINNED7("lpm_trie", struct lb_cidr_key, __u32, lb_service_cidrs, LB_MAX_CIDRS, PIN_DIR "/lb_service_cidrs",
                  BPF_F_NO_PREALLOC);

static __always_inline void lb_count(int which)
{
    __u64 *v = lb_counters.lookup(&which);
    if (v)
        *v += 1;
}
#endif /* MESHACCEL_LAYOUT_ONLY */
/* ---- end of service load balancing ---- */


/* ---- The mesh: who is where, who is enrolled, and what was captured (sock_lb.c, sockops.c,
 * getsockopt.c, ingress.c) ---------------------------------------------------------------------
 * ipcache: every address the agent knows, cluster-wide, as an LPM trie (IPv4 mapped, prefixlen + 96):
 * pod addresses (/128 each, with the pod's identity and mesh flags), this node's own addresses (HOST).
 * local_pods: the pods of this node by network-namespace cookie: a socket's netns tells the kernel,
 * unforgeably, which pod opened it (connect() has no source address yet).
 * Capture (DESIGN.md "Capture without iptables"): connect() of an enrolled pod to an enrolled pod on
 * another node goes to the node Envoy's capture listener on the pod's own loopback; the original
 * destination rides in the socket's local storage (capture_dst) until sockops sees the connection
 * established and files it under (netns, client address, client port) in orig_dst, where the
 * getsockopt program answers Envoy's SO_ORIGINAL_DST for the accepted end. */
#define MESH_MAX_IPCACHE 262144  /* addresses: every pod of the cluster, nodes, policy CIDRs */
#define MESH_MAX_LOCAL_PODS 16384
#define MESH_MAX_ORIG_DST 65536  /* captured connections whose Envoy end may still ask */
#define MESH_CAPTURE_PORT 15001  /* the capture listener, on 127.0.0.1 and ::1 inside each enrolled pod */
#define MESH_HBONE_PORT 15008    /* the HBONE inbound listener, on each enrolled pod's own address */

struct ipcache_key {
    __u32 prefixlen;
    struct ip_addr ip;
};

struct ipcache_entry {
    __u32 identity; /* security identity (0 unknown; see IDENTITY_*) */
    __u32 flags;    /* IPC_F_* */
};
#define IPC_F_LOCAL 1  /* a pod on this node */
#define IPC_F_MTLS 2   /* an enrolled pod (strict or permissive): connections to it from enrolled pods go by HBONE */
#define IPC_F_STRICT 4 /* accepts only mTLS from other nodes: plaintext SYNs from outside the node are dropped */
#define IPC_F_HOST 8   /* an address of this node itself (the node Envoy's upstream connections come from it) */

/* Reserved identities; pods and policy CIDRs get theirs from the agent. */
#define IDENTITY_UNKNOWN 0
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2
#define IDENTITY_REMOTE_NODE 3

struct local_pod_key {
    __u64 netns_cookie;
};

/* Layout 2 (sockops_bpf/layout.py LAYOUT_VERSIONS: the pin is local_pods_v2). */
struct local_pod {
    __u32 identity;
    __u32 flags;        /* POD_F_* */
    struct ip_addr ip4; /* the pod's addresses (zero when it has none of that family): what flows name */
    struct ip_addr ip6; /* a socket of the pod by when its own address says loopback */
};

/* Layout 1 of local_pods, read by its migration (layout.py MIGRATIONS). */
struct local_pod_v1 {
    __u32 identity;
    __u32 flags;
};
#define POD_F_CAPTURE 1 /* enrolled, and this node's Envoy has its capture listener: send to other nodes by HBONE */

/* The Envoy end of a captured connection finds the original destination by its peer: the app's socket. */
struct orig_dst_key {
    __u64 netns_cookie;
    struct ip_addr ip; /* the app's address (loopback) and port, as the accepted socket sees its peer */
    __u16 port;
    __u16 pad;
    __u32 pad2;
};

enum mesh_counter {
    MESH_CNT_CAPTURED = 0,       /* connect() sent to the capture listener */
    MESH_CNT_ORIG_DST_FILED = 1, /* established captured connections filed in orig_dst */
    MESH_CNT_ORIG_DST_ANSWERED = 2,
    MESH_CNT_ORIG_DST_MISSED = 3, /* SO_ORIGINAL_DST asked for a socket we did not capture */
    MESH_CNT_STRICT_DROPPED = 4,  /* plaintext SYNs from outside the node to a strict pod */
    MESH_CNT_MAX = 8,
};

#ifndef MESHACCEL_LAYOUT_ONLY
BPF_TABLE_PINNED7("lpm_trie", struct ipcache_key, struct ipcache_entry, ipcache, MESH_MAX_IPCACHE,
                  PIN_DIR "/ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("hash", struct local_pod_key, struct local_pod, local_pods, MESH_MAX_LOCAL_PODS,
                  PIN_DIR "/local_pods_v2", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct orig_dst_key, struct lb_addr, orig_dst, MESH_MAX_ORIG_DST, PIN_DIR "/orig_dst");
BPF_TABLE_PINNED("percpu_array", int, __u64, mesh_counters, MESH_CNT_MAX, PIN_DIR "/mesh_counters");

/* The original destination of a captured socket, from connect() to sockops (bcc's BPF_SK_STORAGE, pinned). */
struct capture_dst_table_t {
    int key;
    struct lb_addr leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" PIN_DIR "/capture_dst")))
struct capture_dst_table_t capture_dst = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(capture_dst, int, struct lb_addr);

static __always_inline void mesh_count(int which)
{
    __u64 *v = mesh_counters.lookup(&which);
    if (v)
        *v += 1;
}

/* The ipcache entry of an address (exact /128 lookup: the trie answers with the longest prefix). */
static __always_inline struct ipcache_entry *ipcache_of(struct ip_addr *ip)
{
    struct ipcache_key k = {};
    k.prefixlen = 128;
    __builtin_memcpy(&k.ip, ip, sizeof(k.ip));
    return ipcache.lookup(&k);
}
#endif /* MESHACCEL_LAYOUT_ONLY */
/* ---- end of the mesh ---- */


/* ---- Identity policy (sock_lb.c at connect/sendmsg, ingress.c for plaintext from other nodes) ------
 * The agent's compiler (accel/policy) turns NetworkPolicy and the L4 part of Istio AuthorizationPolicy
 * into entries of one LPM trie, keyed (subject, peer, direction, proto, port prefix): the subject is the
 * local pod whose traffic is decided, the peer the other end's identity (ipcache; WORLD when unknown).
 * Lookup: the peer's own entries first; if none covers the port, the entries for every other peer
 * (peer 0); if none either, the subject is not isolated: allow. The compiler writes entries so that this
 * gives every (peer, proto, port) its verdict, deny winning, and never opens a hole while it rewrites
 * (accel/policy/compiler.py). Denies are counted per rule: the rule table is the agent's. */
#define POL_MAX_ENTRIES 524288
#define POL_MAX_RULES 65536
#define POL_ANY_PORT_PREFIXLEN 80 /* subject, peer, direction, proto: the port's bits come on top */
#define POL_INGRESS 0
#define POL_EGRESS 1
#define POL_ALLOW 1
#define POL_DENY 2

struct policy_key {
    __u32 prefixlen;
    __u32 subject;
    __u32 peer; /* 0: any peer without entries of its own */
    __u8 direction;
    __u8 proto;
    __u16 port; /* network byte order: a port range is a few prefixes */
};

struct policy_value {
    __u32 verdict; /* POL_ALLOW or POL_DENY */
    __u32 rule;    /* index into the agent's rule table (object, rule) */
};

#ifndef MESHACCEL_LAYOUT_ONLY
BPF_TABLE_PINNED7("lpm_trie", struct policy_key, struct policy_value, policy, POL_MAX_ENTRIES, PIN_DIR "/policy",
                  BPF_F_NO_PREALLOC);
/* Denied attempts per rule; the agent names the rule (`accel policy check`, /metrics). */
BPF_TABLE_PINNED("percpu_hash", __u32, __u64, policy_denies, POL_MAX_RULES, PIN_DIR "/policy_denies");

/* The verdict for (subject, peer, direction, proto, port); `*rule` names the entry that decided. */
static __always_inline __u32 policy_verdict(__u32 subject, __u32 peer, __u8 direction, __u8 proto, __u16 port,
                                            __u32 *rule)
{
    struct policy_key k = {};
    k.prefixlen = POL_ANY_PORT_PREFIXLEN + 16;
    k.subject = subject;
    k.peer = peer;
    k.direction = direction;
    k.proto = proto;
    k.port = bpf_htons(port);
    struct policy_value *v = policy.lookup(&k);
    if (!v) {
        k.peer = 0;
        v = policy.lookup(&k);
    }
    if (!v)
        return POL_ALLOW;
    *rule = v->rule;
    if (v->verdict == POL_DENY) {
        __u32 r = v->rule;
        __u64 one = 1;
        __u64 *n = policy_denies.lookup(&r);
        if (n)
            *n += 1; /* per-CPU slot */
        else
            policy_denies.update(&r, &one);
    }
    return v->verdict;
}
#endif /* MESHACCEL_LAYOUT_ONLY */
/* ---- end of identity policy ---- */


/* ---- Flows: one event per connection opened, closed or refused (accel/flows_kernel.py reads them) ------
 * Into a ring buffer; a full buffer drops the event and counts it, it never blocks or slows a socket.
 * Reported once per node: by the client's socket when the client is a pod of this node, else by the
 * server's when the client is elsewhere; never a pod's loopback, never a tunnel (a captured connection
 * and HBONE's legs: the node Envoy reports those, with exact bytes and the certificates' identities). A reported socket carries its flow in socket storage (flow_state) and asks for
 * state callbacks (a handful per connection, none per packet) so its close is reported with bytes and
 * duration. Bytes are TCP's own counters; a spliced socket's bytes bypass TCP, so what it reports is a
 * lower bound: the size of the sendmsg() calls that ran the sk_msg program (each verdict covers up to
 * REDIRECT_APPLY_BYTES more), flagged FLOW_F_BYTES_LOWER_BOUND. */
#ifndef FLOW_EVENTS
#define FLOW_EVENTS 1 /* 0 compiles every event out (bench observe measures their cost) */
#endif
#ifndef FLOW_RING_BYTES
/* The kernel takes a ring buffer of a power of 2 times the page size only (4096 at the least); tests
 * compile a small one to overflow it. */
#define FLOW_RING_BYTES (4 << 20)
#endif
#define FLOW_OPEN 1
#define FLOW_CLOSE 2
#define FLOW_REFUSED 3
#define FLOW_PATH_TCP 1
#define FLOW_PATH_SPLICED 2
#define FLOW_PATH_TUNNEL 3 /* captured: to the node Envoy, then HBONE */
#define FLOW_PATH_UDP 4
#define FLOW_REASON_NO_BACKEND 1
#define FLOW_REASON_NO_SERVICE 2
#define FLOW_REASON_POLICY 3
#define FLOW_REASON_STRICT_PLAINTEXT 4
#define FLOW_F_BYTES_LOWER_BOUND 1

struct flow_event {
    __u64 time_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 cookie;  /* the reporting socket's cookie (0 for a refused packet) */
    __u64 bytes_sent;     /* close: from the client's side of the flow */
    __u64 bytes_received;
    __u64 duration_ns;
    struct ip_addr src; /* the client: a pod's own address even when its socket says loopback */
    struct ip_addr dst; /* the server actually reached (a captured connection: its original destination) */
    struct ip_addr svc; /* the service address the application asked for, when the LB translated it */
    __u32 src_identity;
    __u32 dst_identity;
    __u32 rule; /* refused by policy: the rule that decided */
    __u16 sport;
    __u16 dport;
    __u16 svc_port;
    __u8 kind;   /* FLOW_OPEN, FLOW_CLOSE, FLOW_REFUSED */
    __u8 path;   /* FLOW_PATH_* */
    __u8 reason; /* refused: FLOW_REASON_* */
    __u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
    __u8 flags;  /* FLOW_F_* */
    __u8 pad;
};

/* What a reported socket remembers of its flow, for its close. */
struct flow_state {
    __u64 start_ns;
    __u64 spliced_bytes; /* redirected by this socket's sk_msg verdicts: a lower bound */
    struct ip_addr src;
    struct ip_addr dst;
    struct ip_addr svc;
    __u32 src_identity;
    __u32 dst_identity;
    __u16 sport;
    __u16 dport;
    __u16 svc_port;
    __u8 path;
    __u8 client;  /* 1: this socket is the client's (bytes sent are the client's) */
    __u8 spliced; /* 1: in sock_hash, its bytes bypass TCP's counters (reported as a lower bound) */
    __u8 pad[7];
};

enum flow_counter {
    FLOW_CNT_EMITTED = 0,
    FLOW_CNT_DROPPED = 1, /* the ring buffer was full: the event is lost, the connection is not */
    FLOW_CNT_MAX = 4,
};

#ifndef MESHACCEL_LAYOUT_ONLY
/* bcc's BPF_RINGBUF_OUTPUT table shape with a pinned section (as for sock_hash). */
struct flow_events_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_DIR "/flow_events")))
struct flow_events_table_t flow_events = {.max_entries = FLOW_RING_BYTES};
BPF_TABLE_PINNED("percpu_array", int, __u64, flow_counters, FLOW_CNT_MAX, PIN_DIR "/flow_counters");
/* One event under construction per CPU: it is too big for the 512-byte stack next to the rest. */
BPF_TABLE("percpu_array", int, struct flow_event, flow_scratch, 1);

struct flow_state_table_t {
    int key;
    struct flow_state leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" PIN_DIR "/flow_state")))
struct flow_state_table_t flow_state = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(flow_state, int, struct flow_state);

static __always_inline void flow_count(int which)
{
    __u64 *v = flow_counters.lookup(&which);
    if (v)
        *v += 1;
}

/* A zeroed event of `kind`, or NULL (never, but the verifier wants the check). */
static __always_inline struct flow_event *flow_new(__u8 kind)
{
    int zero = 0;
    struct flow_event *e = flow_scratch.lookup(&zero);
    if (!e)
        return 0;
    __builtin_memset(e, 0, sizeof(*e));
    e->kind = kind;
    e->time_ns = bpf_ktime_get_ns();
    return e;
}

static __always_inline void flow_send(struct flow_event *e)
{
    int err = flow_events.ringbuf_output(e, sizeof(*e), 0);
    flow_count(err == 0 ? FLOW_CNT_EMITTED : FLOW_CNT_DROPPED);
}

static __always_inline int ip_equal(struct ip_addr *a, struct ip_addr *b)
{
    /* word by word: __builtin_memcmp becomes a call to memcmp, which eBPF cannot make */
    __u32 *x = (__u32 *)a->addr, *y = (__u32 *)b->addr;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int ip_is_v4(struct ip_addr *ip)
{
    return ip->addr[10] == 0xff && ip->addr[11] == 0xff;
}

static __always_inline int ip_is_loopback(struct ip_addr *ip)
{
    if (ip_is_v4(ip))
        return ip->addr[12] == 127;
    __u32 *w = (__u32 *)ip->addr;
    return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}
#endif /* MESHACCEL_LAYOUT_ONLY */
/* ---- end of flows ---- */

#endif
