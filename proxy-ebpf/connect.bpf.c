// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/connect4 and cgroup/connect6 at the cgroup v2 root: for sockets of enrolled network
 * namespaces, a connect() to a mesh service address is either rewritten to the node proxy (the
 * original destination is kept by socket cookie) or, for L4-only services, load-balanced here to
 * an endpoint (the fast path). Everything else is left untouched.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"
#include "lib/common.h"

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif

/* How the socket addresses the destination: IPv4, IPv6, or IPv4 through an IPv6 socket
 * (::ffff:a.b.c.d, dual stack), which only connect6 sees but which is IPv4 traffic. */
#define NP_SOCK_V4 0
#define NP_SOCK_V6 1
#define NP_SOCK_V4_MAPPED 2

/* Shared tail of connect4/6 once the original destination key is known. */
static __always_inline int np_connect(struct bpf_sock_addr *ctx, struct np_addr *orig, int v6)
{
	const struct np_svc_val *svc;
	struct bpf_sock *sk;
	__u64 netns;

	if (ctx->type != SOCK_STREAM) {
		np_count(NP_R_NOT_TCP);
		return SYS_PROCEED;
	}
	netns = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&np_netns, &netns)) {
		np_count(NP_R_NOT_ENROLLED);
		return SYS_PROCEED;
	}
	/* Second guard besides enrollment: the proxy marks its own upstream sockets. */
	sk = ctx->sk;
	if (sk && sk->mark == NP_PROXY_MARK) {
		np_count(NP_R_PROXY_MARK);
		return SYS_PROCEED;
	}
	svc = bpf_map_lookup_elem(&np_svc, orig);
	if (!svc) {
		/* A service identified by its port alone (a ServiceEntry without addresses, such
		 * as an egress host): every connect to that port goes to the proxy, which routes
		 * by Host or SNI and passes what it does not know to the original destination. */
		struct np_addr any = { .port = orig->port, .family = orig->family };

		svc = bpf_map_lookup_elem(&np_svc, &any);
		if (!svc || svc->mode != NP_MODE_PROXY) {
			np_count(NP_R_NO_SERVICE);
			return SYS_PROCEED;
		}
	}
	if (svc->mode == NP_MODE_FASTPATH) {
		const struct np_backend_val *b = np_pick_backend(svc);

		if (!b || b->addr.family != orig->family) {
			np_count(NP_R_NO_BACKEND);
			np_event(NP_R_NO_BACKEND, netns, orig, NULL);
			return SYS_PROCEED;
		}
		if (v6 == NP_SOCK_V4_MAPPED) {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
			ctx->user_ip6[3] = b->addr.addr[0];
		} else if (v6) {
			ctx->user_ip6[0] = b->addr.addr[0];
			ctx->user_ip6[1] = b->addr.addr[1];
			ctx->user_ip6[2] = b->addr.addr[2];
			ctx->user_ip6[3] = b->addr.addr[3];
		} else {
			ctx->user_ip4 = b->addr.addr[0];
		}
		/* user_port writes must be 4 bytes wide (a 2-byte store is rejected). */
		ctx->user_port = (__u32)b->addr.port;
		np_count(NP_R_FASTPATH);
		return SYS_PROCEED;
	}
	/* Proxy mode. Without a capture address of the destination's family the connection
	 * cannot reach the proxy: it is refused (EPERM), never let through to the service
	 * address, where it would skip every L7 rule (fail closed; counted and reported). */
	if (v6 == NP_SOCK_V6 ?
		    !(np_capture_ip6[0] | np_capture_ip6[1] | np_capture_ip6[2] | np_capture_ip6[3]) :
		    !np_capture_ip4) {
		np_count(NP_R_NO_CAPTURE_ADDR);
		np_event(NP_R_NO_CAPTURE_ADDR, netns, orig, NULL);
		return SYS_REJECT;
	}
	{
		__u64 cookie = bpf_get_socket_cookie(ctx);

		if (bpf_map_update_elem(&np_orig_cookie, &cookie, orig, BPF_ANY)) {
			/* Without the original destination the proxy could not route it: refused
			 * (fail closed, as above), counted and reported. */
			np_count(NP_R_ORIG_DST_FULL);
			np_event(NP_R_ORIG_DST_FULL, netns, orig, NULL);
			return SYS_REJECT;
		}
	}
	if (v6 == NP_SOCK_V4_MAPPED) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = np_capture_ip4;
	} else if (v6) {
		ctx->user_ip6[0] = np_capture_ip6[0];
		ctx->user_ip6[1] = np_capture_ip6[1];
		ctx->user_ip6[2] = np_capture_ip6[2];
		ctx->user_ip6[3] = np_capture_ip6[3];
	} else {
		ctx->user_ip4 = np_capture_ip4;
	}
	ctx->user_port = np_capture_port;
	np_count(NP_R_REDIRECT_PROXY);
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int np_connect4(struct bpf_sock_addr *ctx)
{
	struct np_addr orig = {};

	orig.addr[0] = ctx->user_ip4;
	/* user_port: network order in the low 16 bits. */
	orig.port = (__u16)ctx->user_port;
	orig.family = NP_AF_INET;
	return np_connect(ctx, &orig, NP_SOCK_V4);
}

SEC("cgroup/connect6")
int np_connect6(struct bpf_sock_addr *ctx)
{
	struct np_addr orig = {};
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2];
	__u32 a3 = ctx->user_ip6[3];

	orig.port = (__u16)ctx->user_port;
	/* ::ffff:a.b.c.d from a dual-stack socket is an IPv4 connection: look it up by the
	 * IPv4 key (as Cilium's is_v4_in_v6), or it would escape capture and every L7 rule. */
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff)) {
		orig.addr[0] = a3;
		orig.family = NP_AF_INET;
		return np_connect(ctx, &orig, NP_SOCK_V4_MAPPED);
	}
	orig.addr[0] = a0;
	orig.addr[1] = a1;
	orig.addr[2] = a2;
	orig.addr[3] = a3;
	orig.family = NP_AF_INET6;
	return np_connect(ctx, &orig, NP_SOCK_V6);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
