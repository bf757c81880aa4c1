/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * nodeproxy kernel/userspace ABI: every struct, enum and constant shared by the eBPF programs
 * (proxy-ebpf/*.bpf.c) and their #[repr(C)] mirrors in proxy-userspace/src/dataplane/abi.rs.
 * The eBPF data path (issue 4) fills this header; a layout test keeps both sides in sync.
 */
#pragma once

#include <linux/types.h>

/* Mark on the proxy's own upstream sockets: connect4 never captures them. */
#define NP_PROXY_MARK 0x4e50 /* "NP" */

