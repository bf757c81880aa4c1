// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getsockopt: answer getsockopt(SOL_IP, SO_ORIGINAL_DST) for connections captured by
 * connect4, from the 4-tuple map, so an unmodified proxy (or any tool written for iptables
 * REDIRECT) finds the original destination the standard way (the Merbridge approach). The
 * kernel's own answer (ENOENT without conntrack) is replaced only when the map knows the peer.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"
#include "lib/common.h"

#define NP_SOL_IP 0
#define NP_SO_ORIGINAL_DST 80

/* struct sockaddr_in, without pulling in libc headers. */
struct np_sockaddr_in {
	__u16 family;
	__be16 port;
	__be32 addr;
	__u8 zero[8];
};

SEC("cgroup/getsockopt")
int np_getsockopt(struct bpf_sockopt *ctx)
{
	struct np_sockaddr_in *out;
	struct np_addr client = {};
	struct np_addr *orig;
	struct bpf_sock *sk;

	if (ctx->level != NP_SOL_IP || ctx->optname != NP_SO_ORIGINAL_DST)
		return 1;
	sk = ctx->sk;
	if (!sk || sk->family != NP_AF_INET)
		return 1;
	/* On the accepting side the peer is the captured client. dst_port is network order. */
	client.addr[0] = sk->dst_ip4;
	client.port = (__u16)sk->dst_port;
	client.family = NP_AF_INET;
	orig = bpf_map_lookup_elem(&np_orig_tuple, &client);
	if (!orig || orig->family != NP_AF_INET)
		return 1;
	out = ctx->optval;
	/* The verifier needs the bounds check against optval_end before any store. */
	if ((void *)(out + 1) > ctx->optval_end)
		return 1;
	out->family = NP_AF_INET;
	out->port = orig->port;
	out->addr = orig->addr[0];
	__builtin_memset(out->zero, 0, sizeof(out->zero));
	/* Two separate 4-byte stores: clang would otherwise merge these adjacent fields into one
	 * 8-byte store, which the verifier rejects for bpf_sockopt. */
	*(volatile __s32 *)&ctx->optlen = sizeof(*out);
	*(volatile __s32 *)&ctx->retval = 0;
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
