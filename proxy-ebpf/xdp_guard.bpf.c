// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * XDP guard on the node's uplink: packets arriving from outside the node for the proxy's capture
 * and admin ports, or from a denied source CIDR, are dropped before the stack sees them.
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

SEC("xdp")
int np_xdp_guard(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct tcphdr *tcp;
	__u16 dport;
	__u8 proto;

	/* Every access needs an explicit bounds check against data_end. */
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct np_lpm4 key;

		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		key.prefixlen = 32;
		key.addr = ip->saddr;
		if (bpf_map_lookup_elem(&np_xdp_deny4, &key))
			return np_xdp_verdict(NP_R_XDP_DROP_CIDR, XDP_DROP);
		proto = ip->protocol;
		if (ip->ihl < 5)
			return XDP_PASS;
		tcp = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return XDP_PASS;
		/* Extension headers are not walked: only a TCP next header is checked. */
		proto = ip6->nexthdr;
		tcp = (void *)(ip6 + 1);
	} else {
		return XDP_PASS;
	}
	if (proto != IPPROTO_TCP || (void *)(tcp + 1) > end)
		return XDP_PASS;
	dport = tcp->dest;
	if (bpf_map_lookup_elem(&np_xdp_ports, &dport))
		return np_xdp_verdict(NP_R_XDP_DROP_PORT, XDP_DROP);
	return np_xdp_verdict(NP_R_XDP_PASS, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
