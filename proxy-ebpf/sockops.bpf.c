// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: when a captured client connection reaches ESTABLISHED its local address:port is
 * known, so the original destination moves from the socket-cookie map to the 4-tuple map the
 * proxy reads on accept (keyed by the client address:port it sees as peer).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"
#include "lib/common.h"

SEC("sockops")
int np_sockops(struct bpf_sock_ops *skops)
{
	struct np_addr client = {};
	struct np_addr orig;
	struct np_addr *found;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	found = bpf_map_lookup_elem(&np_orig_cookie, &cookie);
	if (!found)
		return 1;
	orig = *found;
	if (skops->family == NP_AF_INET) {
		client.addr[0] = skops->local_ip4;
		client.family = NP_AF_INET;
	} else {
		client.addr[0] = skops->local_ip6[0];
		client.addr[1] = skops->local_ip6[1];
		client.addr[2] = skops->local_ip6[2];
		client.addr[3] = skops->local_ip6[3];
		client.family = NP_AF_INET6;
	}
	/* local_port is in host order (remote_port would be network order, upper 16 bits). */
	client.port = bpf_htons((__u16)skops->local_port);
	bpf_map_update_elem(&np_orig_tuple, &client, &orig, BPF_ANY);
	bpf_map_delete_elem(&np_orig_cookie, &cookie);
	np_count(NP_R_ESTABLISHED_TRACKED);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
