// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Host program printing the ABI layout, compared with the Rust mirrors by a unit test. */
#include <stddef.h>
#include <stdio.h>

#include "abi.h"

#define SIZE(t) printf("%s %zu\n", #t, sizeof(struct t))
#define OFF(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(struct t, f))

int main(void)
{
	SIZE(np_addr);
	OFF(np_addr, addr);
	OFF(np_addr, port);
	OFF(np_addr, family);
	SIZE(np_svc_val);
	OFF(np_svc_val, mode);
	OFF(np_svc_val, backend_base);
	OFF(np_svc_val, backend_count);
	OFF(np_svc_val, total_weight);
	SIZE(np_backend_key);
	OFF(np_backend_key, base);
	OFF(np_backend_key, index);
	SIZE(np_backend_val);
	OFF(np_backend_val, addr);
	OFF(np_backend_val, weight_end);
	SIZE(np_event);
	OFF(np_event, reason);
	OFF(np_event, pid);
	OFF(np_event, netns_cookie);
	OFF(np_event, orig);
	OFF(np_event, target);
	SIZE(np_sock_key);
	OFF(np_sock_key, local_ip);
	OFF(np_sock_key, remote_ip);
	OFF(np_sock_key, local_port);
	OFF(np_sock_key, remote_port);
	SIZE(np_lpm4);
	OFF(np_lpm4, prefixlen);
	OFF(np_lpm4, addr);
	printf("NP_PROXY_MARK %d\nNP_MAX_BACKENDS %d\nNP_R_MAX %d\n", NP_PROXY_MARK, NP_MAX_BACKENDS, NP_R_MAX);
	return 0;
}
