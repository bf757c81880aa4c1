// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: when a captured client connection reaches ESTABLISHED its local address:port is
 * known, so the original destination moves from the socket-cookie map to the 4-tuple map the
 * proxy reads on accept (keyed by the client address:port it sees as peer). With --sockmap it
 * also puts node-local socket pairs into np_sock_hash for the sk_msg splice.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"
#include "lib/common.h"

/* A socket's own 4-tuple as np_sock_hash keys it. remote_port holds the network-order port in
 * its upper 16 bits (measured on 6.18: bpf_ntohl(x) >> 16 does not give the port;
 * bpf_ntohs(x >> 16) does). */
static __always_inline void np_sock_key_of(struct bpf_sock_ops *skops, struct np_sock_key *key)
{
	key->local_ip = skops->local_ip4;
	key->remote_ip = skops->remote_ip4;
	key->local_port = skops->local_port;
	key->remote_port = bpf_ntohs((__u16)(skops->remote_port >> 16));
}

/*
 * With the sk_msg splice on, both local ends of a captured connection (the client's socket and
 * the proxy's accepted socket on the capture port) go into np_sock_hash, keyed by their own
 * 4-tuple; np_sk_msg then moves each sendmsg straight into the peer's receive queue.
 * Returns 1 when the socket is an end of a captured connection.
 */
static __always_inline int np_sockmap_add(struct bpf_sock_ops *skops, struct np_sock_key *key)
{
	__u32 capture_port = bpf_ntohs((__u16)np_capture_port);

	if (key->local_port != capture_port && key->remote_port != capture_port)
		return 0;
	if (key->local_ip != np_capture_ip4 && key->remote_ip != np_capture_ip4)
		return 0;
	if (!bpf_sock_hash_update(skops, &np_sock_hash, key, BPF_NOEXIST)) {
		np_count(NP_R_SOCKMAP_ADD);
		/* Told of its state changes: it leaves the splice when it sends its FIN. */
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	}
	return 1;
}

/* ACTIVE_ESTABLISHED of one of the proxy's upstream sockets: remember it, so that its peer can
 * join the splice if it is accepted on this node. */
static __always_inline void np_upstream_seen(struct bpf_sock_ops *skops, struct np_sock_key *key)
{
	struct bpf_sock *sk = skops->sk;
	__u32 seen = 0;

	if (!sk || sk->mark != NP_PROXY_MARK)
		return;
	bpf_map_update_elem(&np_upstream, key, &seen, BPF_ANY);
}

/* PASSIVE_ESTABLISHED: a socket accepted from one of the proxy's upstream sockets is on this
 * node, so it joins np_sock_hash and tells the proxy (value 1) to add its own end. */
static __always_inline void np_upstream_accepted(struct bpf_sock_ops *skops,
						 struct np_sock_key *key)
{
	struct np_sock_key peer = {
		.local_ip = key->remote_ip,
		.remote_ip = key->local_ip,
		.local_port = key->remote_port,
		.remote_port = key->local_port,
	};
	__u32 *state = bpf_map_lookup_elem(&np_upstream, &peer);

	if (!state || *state != 0)
		return;
	if (bpf_sock_hash_update(skops, &np_sock_hash, key, BPF_NOEXIST))
		return;
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	*state = 1;
	np_count(NP_R_SOCKMAP_UPSTREAM);
}

SEC("sockops")
int np_sockops(struct bpf_sock_ops *skops)
{
	struct np_addr client = {};
	struct np_addr orig;
	struct np_addr *found;
	struct np_sock_key key = {};
	__u64 cookie;

	/* A spliced end that sends its FIN leaves the splice first (the state changes to
	 * FIN_WAIT1 before the FIN goes out): kept in, a half-closing client's FIN did not reach
	 * the proxy until the client closed, and its answer was lost (tests/e2e/splice.rs). The
	 * receiving end stays: leaving would drop what the splice queued for it, unread. */
	if (skops->op == BPF_SOCK_OPS_STATE_CB) {
		if (skops->family == NP_AF_INET &&
		    skops->args[1] == BPF_TCP_FIN_WAIT1) {
			np_sock_key_of(skops, &key);
			bpf_map_delete_elem(&np_sock_hash, &key);
		}
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (np_sockmap && skops->family == NP_AF_INET) {
		np_sock_key_of(skops, &key);
		if (!np_sockmap_add(skops, &key)) {
			if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
				np_upstream_accepted(skops, &key);
			else
				np_upstream_seen(skops, &key);
		}
	}
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	found = bpf_map_lookup_elem(&np_orig_cookie, &cookie);
	if (!found)
		return 1;
	orig = *found;
	if (skops->family == NP_AF_INET) {
		client.addr[0] = skops->local_ip4;
		client.family = NP_AF_INET;
	} else if (skops->local_ip6[0] == 0 && skops->local_ip6[1] == 0 &&
		   skops->local_ip6[2] == bpf_htonl(0x0000ffff)) {
		/* A dual-stack socket's IPv4 connection (connect6 of ::ffff:VIP): the proxy accepts
		 * it on its IPv4 capture address and looks it up by the IPv4 peer. */
		client.addr[0] = skops->local_ip6[3];
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
