/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maps and helpers shared by the socket programs. connect.bpf.c and sockops.bpf.c are separate
 * objects; their maps are pinned by name in the loader's pin directory, so the second object
 * loaded reuses the first one's maps (libbpf LIBBPF_PIN_BY_NAME semantics, honoured by aya).
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"

#define SYS_PROCEED 1
#define SYS_REJECT 0

/* Service address:port -> handling. Written by userspace from each snapshot. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct np_addr);
	__type(value, struct np_svc_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_svc SEC(".maps");

/* Fast-path endpoints, {base, index} -> endpoint. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct np_backend_key);
	__type(value, struct np_backend_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_backends SEC(".maps");

/* Enrolled network namespaces by netns cookie (the Kmesh approach: the host netns and the
 * proxy's own netns are never in it, so they are never captured by construction). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_netns SEC(".maps");

/* Original destination by socket cookie, from connect until ESTABLISHED. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct np_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_orig_cookie SEC(".maps");

/* Original destination by the client's address:port, read (and deleted) by the proxy on accept. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct np_addr);
	__type(value, struct np_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_orig_tuple SEC(".maps");

/* Decision counters by enum np_reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NP_R_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_counters SEC(".maps");

/* Notable events for userspace logs. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_events SEC(".maps");

/* Local sockets spliced by sk_msg: both ends of captured connections (client <-> proxy) and of
 * the proxy's upstream connections to sockets on this node (proxy <-> endpoint). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct np_sock_key);
	__type(value, __u32); /* socket fd on update from userspace; aya expects 4 bytes */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_sock_hash SEC(".maps");

/*
 * The proxy's upstream connections (SO_MARK NP_PROXY_MARK) by their own 4-tuple, from
 * ACTIVE_ESTABLISHED: 0 = seen; 1 = the accepting end is a socket on this node and joined
 * np_sock_hash at PASSIVE_ESTABLISHED. The proxy reads and deletes the entry right after
 * connect() and, on 1, adds its own end before sending a byte, so both directions are spliced
 * from the first byte. Entries of remote upstreams (never 1) are deleted by the same read.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct np_sock_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_upstream SEC(".maps");

/* Where captured connections go; set at load time (EbpfLoader::set_global). */
volatile const __u32 np_capture_ip4 = 0;   /* network order */
volatile const __u32 np_capture_port = 0;  /* network order, low 16 bits */
volatile const __u32 np_capture_ip6[4] = {}; /* network order; all zero: IPv6 not captured */
volatile const __u32 np_sockmap = 0;         /* 1: splice client<->proxy bytes with sk_msg */

static __always_inline void np_count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&np_counters, &reason);

	if (c)
		*c += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline void np_event(__u32 reason, __u64 netns, const struct np_addr *orig,
				     const struct np_addr *target)
{
	struct np_event *e = bpf_ringbuf_reserve(&np_events, sizeof(*e), 0);

	if (!e)
		return; /* ring full: the counter still records it */
	e->reason = reason;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->netns_cookie = netns;
	e->orig = *orig;
	if (target)
		e->target = *target;
	else
		__builtin_memset(&e->target, 0, sizeof(e->target));
	bpf_ringbuf_submit(e, 0);
}

/* Weighted endpoint pick: one uniform draw against cumulative weights, bounded scan. */
static __always_inline const struct np_backend_val *np_pick_backend(const struct np_svc_val *svc)
{
	__u32 total = svc->total_weight;
	__u32 r;
	int i;

	if (!total || !svc->backend_count)
		return NULL;
	r = bpf_get_prandom_u32() % total;
	for (i = 0; i < NP_MAX_BACKENDS; i++) {
		struct np_backend_key k = { .base = svc->backend_base, .index = i };
		const struct np_backend_val *b;

		if ((__u32)i >= svc->backend_count)
			break;
		b = bpf_map_lookup_elem(&np_backends, &k);
		if (b && r < b->weight_end)
			return b;
	}
	return NULL;
}
