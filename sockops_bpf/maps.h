/* Map layouts shared by every meshaccel eBPF program. The Python mirror is sockops_bpf/layout.py;
 * tests/test_layout.py keeps the two equal (sizes and offsets). Addresses are always 16 bytes:
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
#endif
