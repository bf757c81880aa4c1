// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_msg on np_sock_hash: a send on one local end of a spliced connection is delivered
 * straight to the other end's receive queue (bpf_msg_redirect_hash, ingress), skipping the TCP/IP
 * stack between the client pod and the proxy, and between the proxy and an endpoint on this
 * node. A socket whose peer is not in the map (an upstream's accepting end when the proxy did
 * not add its own) passes to TCP. Off unless --sockmap is given: Cilium removed its sockmap
 * acceleration (1.14) as fragile, so it stays opt-in and measured.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"
#include "lib/common.h"

SEC("sk_msg")
int np_sk_msg(struct sk_msg_md *msg)
{
	struct np_sock_key peer = {};

	if (msg->family != NP_AF_INET)
		return SK_PASS;
	/* The peer socket's key is ours reversed. remote_port: network-order port in the upper 16
	 * bits, as in sockops. */
	peer.local_ip = msg->remote_ip4;
	peer.remote_ip = msg->local_ip4;
	peer.local_port = bpf_ntohs((__u16)(msg->remote_port >> 16));
	peer.remote_port = msg->local_port;
	if (bpf_msg_redirect_hash(msg, &np_sock_hash, &peer, BPF_F_INGRESS) == SK_PASS)
		np_count(NP_R_SOCKMAP_REDIRECT);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
