/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * nodeproxy kernel/userspace ABI: every struct, enum and constant shared by the eBPF programs
 * and their #[repr(C)] mirrors in proxy-userspace/src/dataplane/abi.rs. Change both sides and the
 * layout test (proxy-ebpf/abi_layout.c) together.
 *
 * Byte order: addresses and ports are stored in network byte order, as the kernel hands them to
 * cgroup/connect4 (user_ip4, user_port) - so a connect-time lookup needs no conversion.
 */
#pragma once

#include <linux/types.h>

/* Mark on the proxy's own upstream sockets: connect4/6 never capture them. */
#define NP_PROXY_MARK 0x4e50 /* "NP" */

/* Upper bound of the kernel's weighted endpoint scan (bounded loop for the verifier). */
#define NP_MAX_BACKENDS 64

#define NP_AF_INET 2
#define NP_AF_INET6 10

/* What connect() does with a service address:port. */
enum np_mode {
	NP_MODE_PROXY = 1,    /* rewrite to the node proxy, remember the original destination */
	NP_MODE_FASTPATH = 2, /* pick a weighted endpoint in the kernel and connect straight to it */
};

/* Reason codes: per-CPU counters and event reasons. Keep in sync with dataplane/abi.rs. */
enum np_reason {
	NP_R_NOT_TCP = 0,
	NP_R_NOT_ENROLLED = 1,
	NP_R_PROXY_MARK = 2,
	NP_R_NO_SERVICE = 3,
	NP_R_REDIRECT_PROXY = 4,
	NP_R_FASTPATH = 5,
	NP_R_NO_BACKEND = 6,
	NP_R_ORIG_DST_FULL = 7,
	NP_R_ESTABLISHED_TRACKED = 8,
	NP_R_XDP_DROP_PORT = 9,
	NP_R_XDP_DROP_CIDR = 10,
	NP_R_XDP_PASS = 11,
	NP_R_NO_CAPTURE_ADDR = 12,
	NP_R_SOCKMAP_ADD = 13,
	NP_R_SOCKMAP_REDIRECT = 14,
	NP_R_SOCKMAP_UPSTREAM = 15, /* an upstream's accepting end on this node joined the splice */
	NP_R_XDP_DROP_FRAG = 16, /* a later fragment of a TCP segment (no port to check) */
	NP_R_XDP_DROP_MALFORMED = 17, /* cut off, or more headers than are parsed */
	NP_R_MAX = 18,
};

/* An IPv4 or IPv6 socket address. IPv4 uses addr[0]. */
struct np_addr {
	__u32 addr[4]; /* network order */
	__u16 port;    /* network order */
	__u16 family;  /* NP_AF_INET or NP_AF_INET6 */
};
_Static_assert(sizeof(struct np_addr) == 20, "np_addr layout");

/* Value of np_svc: how connects to a service address are handled. */
struct np_svc_val {
	__u32 mode;          /* enum np_mode */
	__u32 backend_base;  /* key prefix of this service's entries in np_backends */
	__u32 backend_count; /* entries 0..count-1 */
	__u32 total_weight;  /* sum of weights (the last weight_end) */
};
_Static_assert(sizeof(struct np_svc_val) == 16, "np_svc_val layout");

struct np_backend_key {
	__u32 base;
	__u32 index;
};
_Static_assert(sizeof(struct np_backend_key) == 8, "np_backend_key layout");

/* One fast-path endpoint; weight_end is cumulative, so a uniform draw picks by weight. */
struct np_backend_val {
	struct np_addr addr;
	__u32 weight_end;
};
_Static_assert(sizeof(struct np_backend_val) == 24, "np_backend_val layout");

/* A notable decision, sent through the np_events ring buffer. */
struct np_event {
	__u32 reason; /* enum np_reason */
	__u32 pid;
	__u64 netns_cookie;
	struct np_addr orig;
	struct np_addr target;
};
_Static_assert(sizeof(struct np_event) == 56, "np_event layout");

/* Key of np_sock_hash: a local TCP socket by its own 4-tuple (IPv4). */
struct np_sock_key {
	__u32 local_ip;    /* network order */
	__u32 remote_ip;   /* network order */
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
};
_Static_assert(sizeof(struct np_sock_key) == 16, "np_sock_key layout");

/* LPM key of the XDP deny list (IPv4). */
struct np_lpm4 {
	__u32 prefixlen;
	__u32 addr; /* network order */
};
_Static_assert(sizeof(struct np_lpm4) == 8, "np_lpm4 layout");
