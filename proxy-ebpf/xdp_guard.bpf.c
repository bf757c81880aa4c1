// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * XDP guard on the node's uplink: packets arriving from outside the node for the proxy's capture
 * and admin ports, or from a denied source CIDR, are dropped before the stack sees them. It
 * fails closed on what it cannot parse: VLAN tags are parsed (two), IPv6 extension headers
 * walked, later fragments of TCP segments and segments cut off before their ports dropped.
 * Everything else passes. Drops are counted by reason.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"

/* Destination ports (network order) that must not be reached from outside. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} np_xdp_ports SEC(".maps");

/* Denied IPv4 source prefixes. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct np_lpm4);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} np_xdp_deny4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NP_R_MAX);
	__type(key, __u32);
	__type(value, __u64);
} np_xdp_counters SEC(".maps");

static __always_inline int np_xdp_verdict(__u32 reason, int verdict)
{
	__u64 *c = bpf_map_lookup_elem(&np_xdp_counters, &reason);

	if (c)
		*c += 1;
	return verdict;
}

/* IPv6 extension headers walked before giving up (fail closed). */
#define NP_V6_EXT_MAX 6
#define NP_ETH_P_8021Q 0x8100
#define NP_ETH_P_8021AD 0x88A8

struct np_vlan {
	__be16 tci;
	__be16 proto;
};

/* The destination port of a TCP segment at `l4`: 0 when the header is cut off before it. */
static __always_inline __u16 np_dport(void *l4, void *end)
{
	__be16 *ports = l4;

	if ((void *)(ports + 2) > end)
		return 0;
	return ports[1];
}

/* The verdict on a TCP destination port (0: unknown, the header is cut off: dropped). */
static __always_inline int np_port_verdict(__u16 dport)
{
	if (!dport)
		return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
	if (bpf_map_lookup_elem(&np_xdp_ports, &dport))
		return np_xdp_verdict(NP_R_XDP_DROP_PORT, XDP_DROP);
	return np_xdp_verdict(NP_R_XDP_PASS, XDP_PASS);
}

static __always_inline int np_guard_v4(struct iphdr *ip, void *end)
{
	struct np_lpm4 key;
	__u16 frag;

	if ((void *)(ip + 1) > end)
		return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
	key.prefixlen = 32;
	key.addr = ip->saddr;
	if (bpf_map_lookup_elem(&np_xdp_deny4, &key))
		return np_xdp_verdict(NP_R_XDP_DROP_CIDR, XDP_DROP);
	if (ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	if (ip->ihl < 5)
		return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
	/* A later fragment of a TCP segment carries no port to check: dropped (TCP does not
	 * fragment on a sane path; a fragmented segment to this node is an evasion). */
	frag = bpf_ntohs(ip->frag_off);
	if (frag & 0x1fff)
		return np_xdp_verdict(NP_R_XDP_DROP_FRAG, XDP_DROP);
	return np_port_verdict(np_dport((void *)ip + ip->ihl * 4, end));
}

static __always_inline int np_guard_v6(struct ipv6hdr *ip6, void *end)
{
	void *l4 = ip6 + 1;
	__u8 next;

	if ((void *)(ip6 + 1) > end)
		return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
	next = ip6->nexthdr;
	/* Walk hop-by-hop, routing, fragment and destination options headers to the upper layer. */
#pragma unroll
	for (int i = 0; i < NP_V6_EXT_MAX; i++) {
		__u8 *h = l4;

		if (next == IPPROTO_TCP)
			return np_port_verdict(np_dport(l4, end));
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING &&
		    next != IPPROTO_FRAGMENT && next != IPPROTO_DSTOPTS)
			return XDP_PASS;
		if ((void *)(h + 8) > end)
			return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
		if (next == IPPROTO_FRAGMENT) {
			/* Offset in 8-byte units in the upper 13 bits of bytes 2..3. */
			__u16 off = ((__u16)h[2] << 8 | h[3]) & 0xfff8;

			if (off && h[0] == IPPROTO_TCP)
				return np_xdp_verdict(NP_R_XDP_DROP_FRAG, XDP_DROP);
			next = h[0];
			l4 = h + 8;
		} else {
			next = h[0];
			l4 = h + 8 + (__u32)h[1] * 8;
		}
	}
	/* More extension headers than are walked: what follows cannot be checked. */
	return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
}

SEC("xdp")
int np_xdp_guard(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *l3 = eth + 1;
	__be16 proto;

	/* Every access needs an explicit bounds check against data_end. */
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	proto = eth->h_proto;
	/* Up to two VLAN tags (802.1ad outer, 802.1Q inner). */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		struct np_vlan *v = l3;

		if (proto != bpf_htons(NP_ETH_P_8021Q) && proto != bpf_htons(NP_ETH_P_8021AD))
			break;
		if ((void *)(v + 1) > end)
			return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
		proto = v->proto;
		l3 = v + 1;
	}
	if (proto == bpf_htons(ETH_P_IP))
		return np_guard_v4(l3, end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return np_guard_v6(l3, end);
	if (proto == bpf_htons(NP_ETH_P_8021Q) || proto == bpf_htons(NP_ETH_P_8021AD))
		/* A third tag: not parsed, not passed. */
		return np_xdp_verdict(NP_R_XDP_DROP_MALFORMED, XDP_DROP);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
