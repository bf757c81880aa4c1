//! The eBPF data path: load the C programs with aya, attach them to the cgroup v2 root (connect4,
//! connect6, sockops) and optionally to uplink interfaces (XDP guard), keep the kernel maps in
//! step with each snapshot, enroll network namespaces, and hand the proxy the original
//! destination of each captured connection.
//!
//! Lifecycle: the kernel state outlives the process. Maps are pinned by name under
//! `<bpffs>/nodeproxy/maps-<ABI>` (the ABI is a hash of the headers that define them) and every
//! program is attached through a link pinned under `<bpffs>/nodeproxy/links` (`links.rs`), so
//! after an exit or a kill the fast path keeps balancing L4 services and enrolled pods stay
//! enrolled; connects to L7 services reach the capture address, where nothing listens, and are
//! refused (fail closed, never around the proxy). A start adopts the pinned maps of the same
//! ABI (its first sync rewrites every service entry), or creates fresh ones, fills them, and
//! swaps its programs into the pinned links (`BPF_LINK_UPDATE`: atomic), then removes the old
//! maps. One instance per pin directory (`pinlock.rs`); a second one takes over from the first
//! (`app/handover.rs`) or fails. Only [`uninstall`] removes the pins (and with them
//! the programs).

pub mod abi;
mod links;
mod load;
pub mod netns;
pub mod pinlock;
pub mod services;
mod sys;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupSockAddr, CgroupSockopt, SkMsg, SockOps, Xdp};
use aya::{Ebpf, EbpfLoader};
use serde::Serialize;

use self::abi::{NpAddr, NpBackendKey, NpBackendVal, NpSvcVal, REASONS};
use self::services::{KernelService, kernel_services};
use crate::compile::Snapshot;

static CONNECT_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connect.bpf.o"));
static GETSOCKOPT_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/getsockopt.bpf.o"));
static SK_MSG_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sk_msg.bpf.o"));
static SOCKOPS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockops.bpf.o"));
static XDP_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_guard.bpf.o"));

/// The maps' ABI (a hash of the headers that define them, from build.rs): pinned maps live in
/// `maps-<MAP_ABI>`.
pub const MAP_ABI: &str = env!("NP_MAP_ABI");

/// Default bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Default capture port.
pub const DEFAULT_CAPTURE_PORT: u16 = 15001;

/// What went wrong loading or driving the data path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not root.
    #[error(
        "--capture ebpf needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load eBPF programs and attach them to the cgroup root; run as root or use --capture none"
    )]
    NotRoot,
    /// Another instance serves this pin directory.
    #[error(transparent)]
    PinLock(#[from] pinlock::LockError),
    /// No cgroup v2.
    #[error(
        "no cgroup2 mount in /proc/mounts: --capture ebpf needs the unified cgroup hierarchy (cgroup v2)"
    )]
    NoCgroup2,
    /// bpffs could not be mounted or prepared.
    #[error("prepare bpffs pin directory {path}")]
    Bpffs {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused an object.
    #[error("load eBPF object {object} (kernel or verifier refused it)")]
    Load {
        /// Object name.
        object: &'static str,
        /// Cause.
        #[source]
        source: aya::EbpfError,
    },
    /// A program could not be loaded or attached.
    #[error("{action} eBPF program {name}")]
    Program {
        /// `load` or `attach ... to ...`.
        action: String,
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map {name}: {what}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Operation.
        what: String,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// Something expected in the object is missing.
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    /// A network namespace could not be used.
    #[error("network namespace {path}")]
    Netns {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another I/O failure.
    #[error("{what}")]
    Io {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// How to set up the data path.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where captured connections arrive (the proxy listens here).
    pub capture: SocketAddr,
    /// A second capture address of the other family (IPv6 beside IPv4), same port: connects
    /// to services of that family are sent there.
    pub capture_alt: Option<SocketAddr>,
    /// Network namespaces to enroll at start.
    pub enroll: Vec<PathBuf>,
    /// Interfaces to guard with XDP.
    pub uplinks: Vec<String>,
    /// Ports the XDP guard drops from outside (capture, admin).
    pub guard_ports: Vec<u16>,
    /// Source CIDRs the XDP guard drops.
    pub deny_cidrs: Vec<ipnet::Ipv4Net>,
    /// bpffs mount point.
    pub bpffs: PathBuf,
    /// Splice node-local bytes with sockops + sk_msg: captured client<->proxy, and the proxy's
    /// HTTP/1 upstreams to sockets on this node (off by default).
    pub sockmap: bool,
}

struct Maps {
    svc: BpfHashMap<MapData, NpAddr, NpSvcVal>,
    backends: BpfHashMap<MapData, NpBackendKey, NpBackendVal>,
    netns: BpfHashMap<MapData, u64, u32>,
    orig_tuple: BpfHashMap<MapData, NpAddr, NpAddr>,
    counters: PerCpuArray<MapData, u64>,
    xdp_counters: Option<PerCpuArray<MapData, u64>>,
}

/// What is in the service map for one address.
#[derive(Debug, Clone)]
struct Installed {
    /// `None`: adopted from a predecessor's maps, not written by this run yet.
    svc: Option<KernelService>,
    base: u32,
    count: usize,
}

struct State {
    maps: Maps,
    installed: BTreeMap<SocketAddr, Installed>,
    next_base: u32,
    enrolled: BTreeMap<PathBuf, u64>,
}

/// The loaded and attached data path. Dropping it closes this process's descriptors only: the
/// pinned programs and maps stay (see [`uninstall`]).
pub struct Kernel {
    state: Mutex<State>,
    /// Kept alive: programs and their links.
    _objects: Vec<Ebpf>,
    pin_dir: PathBuf,
    captures: Vec<SocketAddr>,
    attached: Vec<String>,
    /// The maps were a predecessor's.
    adopted: bool,
    /// The sk_msg splice's maps (`--sockmap`).
    splice: Option<Splice>,
    /// A successor took the kernel state over: this instance no longer writes to the maps.
    handed_over: std::sync::atomic::AtomicBool,
    /// The pin directory's lock: the last field, so it is released after the programs are
    /// detached and the pins removed.
    _lock: pinlock::PinLock,
}

/// The maps of the sk_msg splice.
struct Splice {
    /// np_sock_hash: the spliced sockets (the programs add most; the proxy adds its upstream
    /// ends).
    sock_hash: Mutex<aya::maps::SockHash<MapData, abi::NpSockKey>>,
    /// np_upstream: the proxy's upstream sockets, and whether their peer joined np_sock_hash.
    upstream: BpfHashMap<MapData, abi::NpSockKey, u32>,
}

/// `/kernel` view.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelStatus {
    /// Where captured connections arrive.
    pub capture: SocketAddr,
    /// Programs and where they are attached.
    pub attached: Vec<String>,
    /// Pin directory of the shared maps.
    pub pin_dir: PathBuf,
    /// Enrolled namespaces and their cookies.
    pub enrolled: BTreeMap<PathBuf, u64>,
    /// Entries of the kernel's enrollment map (besides `enrolled`, those adopted from a
    /// predecessor that this instance has not enrolled again).
    pub enrolled_in_kernel: usize,
    /// Whether the maps were adopted from a predecessor.
    pub adopted: bool,
    /// Service map: address → mode, endpoints, why the proxy is needed.
    pub services: BTreeMap<String, serde_json::Value>,
    /// Counters by reason (socket programs and XDP guard).
    pub counters: BTreeMap<&'static str, u64>,
}

/// The cgroup v2 mount point, from /proc/mounts (hybrid hosts have it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(path))
    })
}

fn map_err(
    name: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> Error {
    let what = what.into();
    move |source| Error::Map { name, what, source }
}

impl Kernel {
    /// The ring buffer of kernel events (for [`spawn_events`]); taken from the pinned map.
    pub fn events(&self) -> Result<RingBuf<MapData>, Error> {
        let data = MapData::from_pin(
            self.pin_dir
                .join(format!("maps-{MAP_ABI}"))
                .join("np_events"),
        )
        .map_err(map_err("np_events", "open pin"))?;
        RingBuf::try_from(aya::maps::Map::RingBuf(data)).map_err(map_err("np_events", "open"))
    }

    /// Enroll the network namespace at `path`: its sockets become subject to capture.
    pub fn enroll(&self, path: &Path) -> Result<u64, Error> {
        self.enroll_as(path, path)
    }

    /// Enroll the namespace at `netns` under the name `key` (a pod's `/proc/<pid>/ns/net` is
    /// only valid while that process lives; the key stays). Re-enrolling a key with another
    /// namespace removes the old one from the map first.
    pub fn enroll_as(&self, key: &Path, netns: &Path) -> Result<u64, Error> {
        let cookie = netns::cookie(netns).map_err(|source| Error::Netns {
            path: netns.to_path_buf(),
            source,
        })?;
        if self.is_handed_over() {
            return Ok(cookie);
        }
        let mut st = self.state.lock().expect("kernel lock");
        st.maps
            .netns
            .insert(cookie, 1, 0)
            .map_err(map_err("np_netns", format!("enroll {}", key.display())))?;
        if let Some(old) = st.enrolled.insert(key.to_path_buf(), cookie)
            && old != cookie
        {
            let _ = st.maps.netns.remove(&old);
        }
        tracing::info!(key = %key.display(), netns = %netns.display(), cookie, "enrolled");
        Ok(cookie)
    }

    /// Remove an enrolled namespace (by the path it was enrolled with).
    pub fn unenroll(&self, path: &Path) -> Result<bool, Error> {
        if self.is_handed_over() {
            return Ok(false);
        }
        let mut st = self.state.lock().expect("kernel lock");
        let Some(cookie) = st.enrolled.remove(path) else {
            return Ok(false);
        };
        match st.maps.netns.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                return Err(map_err("np_netns", format!("unenroll {}", path.display()))(
                    e,
                ));
            }
        }
        tracing::info!(netns = %path.display(), "unenrolled");
        Ok(true)
    }

    /// Bring the service and endpoint maps in step with `snap`. For a changed service the new
    /// endpoints are written first, then the service entry is switched to them, then the old
    /// entries are deleted: a live service is never missing from the map.
    pub fn sync(&self, snap: &Snapshot) -> Result<(), Error> {
        if self.is_handed_over() {
            return Ok(());
        }
        let desired = kernel_services(snap);
        let mut st = self.state.lock().expect("kernel lock");
        let st = &mut *st;
        for (addr, ks) in &desired {
            if st
                .installed
                .get(addr)
                .is_some_and(|i| i.svc.as_ref() == Some(ks))
            {
                continue;
            }
            let base = st.next_base;
            st.next_base = st.next_base.wrapping_add(1).max(1);
            let mut end = 0u32;
            for (i, (ep, w)) in ks.backends.iter().enumerate() {
                end += w;
                let key = NpBackendKey {
                    base,
                    index: i as u32,
                };
                let val = NpBackendVal {
                    addr: NpAddr::from_socket(*ep),
                    weight_end: end,
                };
                st.maps
                    .backends
                    .insert(key, val, 0)
                    .map_err(map_err("np_backends", format!("insert {ep}")))?;
            }
            let val = NpSvcVal {
                mode: ks.mode,
                backend_base: base,
                backend_count: ks.backends.len() as u32,
                total_weight: end,
            };
            st.maps
                .svc
                .insert(NpAddr::from_socket(*addr), val, 0)
                .map_err(map_err("np_svc", format!("insert {addr}")))?;
            if let Some(old) = st.installed.insert(
                *addr,
                Installed {
                    svc: Some(ks.clone()),
                    base,
                    count: ks.backends.len(),
                },
            ) {
                remove_backends(&mut st.maps, old.base, old.count);
            }
        }
        let gone: Vec<SocketAddr> = st
            .installed
            .keys()
            .filter(|a| !desired.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            match st.maps.svc.remove(&NpAddr::from_socket(addr)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("np_svc", format!("remove {addr}"))(e)),
            }
            if let Some(old) = st.installed.remove(&addr) {
                remove_backends(&mut st.maps, old.base, old.count);
            }
        }
        Ok(())
    }

    /// The original destination of a captured connection from `peer` (read and deleted).
    pub fn take_orig_dst(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let key = NpAddr::from_socket(peer);
        let mut st = self.state.lock().expect("kernel lock");
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        // One system call per captured connection instead of a lookup and a delete.
        match sys::lookup_and_delete::<NpAddr, NpAddr>(st.maps.orig_tuple.map().fd().as_fd(), &key)
        {
            Ok(orig) => orig?.to_socket(),
            // Kernels before 5.14 have no lookup-and-delete on hash maps (EINVAL, or the
            // kernel-internal ENOTSUPP, 524).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | 524)) => {
                let orig = st.maps.orig_tuple.get(&key, 0).ok()?;
                let _ = st.maps.orig_tuple.remove(&key);
                orig.to_socket()
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "np_orig_tuple: lookup and delete");
                None
            }
        }
    }

    /// With the sk_msg splice on (`--sockmap`): the pool's hook that offers each new upstream
    /// connection to [`Kernel::splice_upstream`]. It holds the kernel weakly, so it does nothing
    /// once the data path is gone.
    pub fn splice_hook(self: &std::sync::Arc<Self>) -> Option<crate::upstream::pool::ConnectHook> {
        self.splice.as_ref()?;
        let weak = std::sync::Arc::downgrade(self);
        Some(std::sync::Arc::new(move |stream, first| {
            if let (Some(k), Ok(local), Ok(peer)) =
                (weak.upgrade(), stream.local_addr(), stream.peer_addr())
            {
                k.splice_upstream(
                    stream,
                    local,
                    peer,
                    first == crate::upstream::pool::FirstByte::Proxy,
                );
            }
        }))
    }

    /// A new upstream connection of the proxy, before its first byte: if its accepting end is a
    /// socket on this node, sockops has put that end into np_sock_hash (np_upstream says so),
    /// and with `splice` this adds the proxy's end, so every byte both ways is spliced. Only
    /// for protocols in which the proxy speaks first (HTTP/1): a byte the peer sent before this
    /// call would still travel TCP and could be read after spliced ones. Without `splice` the
    /// np_upstream entry is only removed (the peer's end alone in np_sock_hash changes nothing:
    /// its sends find no peer to splice to and go by TCP). Returns whether it was spliced.
    pub fn splice_upstream(
        &self,
        sock: &impl AsRawFd,
        local: SocketAddr,
        peer: SocketAddr,
        splice: bool,
    ) -> bool {
        let (Some(maps), Some(key)) = (&self.splice, abi::NpSockKey::of(local, peer)) else {
            return false;
        };
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        match sys::lookup_and_delete::<abi::NpSockKey, u32>(maps.upstream.map().fd().as_fd(), &key)
        {
            Ok(Some(1)) if splice => {}
            // 0: the peer is not on this node (or was accepted after this connect returned);
            // or the peer may speak first.
            Ok(_) => return false,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "np_upstream: lookup and delete");
                return false;
            }
        }
        let mut hash = maps.sock_hash.lock().expect("sock hash lock");
        const BPF_NOEXIST: u64 = 1;
        match hash.insert(key, sock.as_raw_fd(), BPF_NOEXIST) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "np_sock_hash: add upstream socket");
                false
            }
        }
    }

    /// Record an original destination for a client address (what sockops does at ESTABLISHED);
    /// used by tests and by tools replaying state.
    pub fn remember_orig_dst(&self, client: SocketAddr, orig: SocketAddr) -> Result<(), Error> {
        let mut st = self.state.lock().expect("kernel lock");
        st.maps
            .orig_tuple
            .insert(NpAddr::from_socket(client), NpAddr::from_socket(orig), 0)
            .map_err(map_err("np_orig_tuple", format!("insert {client}")))
    }

    /// Counters summed over CPUs, by reason name.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let st = self.state.lock().expect("kernel lock");
        let mut out = BTreeMap::new();
        for (i, name) in REASONS.iter().enumerate() {
            let mut total = 0u64;
            for m in std::iter::once(&st.maps.counters).chain(st.maps.xdp_counters.as_ref()) {
                if let Ok(v) = m.get(&(i as u32), 0) {
                    total += v.iter().sum::<u64>();
                }
            }
            out.insert(*name, total);
        }
        out
    }

    /// Where captured connections arrive (the first capture address).
    pub fn capture(&self) -> SocketAddr {
        self.captures[0]
    }

    /// Every capture address (one per address family).
    pub fn captures(&self) -> &[SocketAddr] {
        &self.captures
    }

    /// Everything `/kernel` shows.
    pub fn status(&self) -> KernelStatus {
        let counters = self.counters();
        let st = self.state.lock().expect("kernel lock");
        let services = st
            .installed
            .iter()
            .filter_map(|(a, i)| Some((a, i.svc.as_ref()?)))
            .map(|(a, i)| {
                let mode = if i.mode == abi::NP_MODE_FASTPATH {
                    "fastpath"
                } else {
                    "proxy"
                };
                let eps: Vec<String> = i
                    .backends
                    .iter()
                    .map(|(e, w)| format!("{e} w={w}"))
                    .collect();
                (
                    a.to_string(),
                    serde_json::json!({ "mode": mode, "endpoints": eps, "whyProxy": i.why_proxy }),
                )
            })
            .collect();
        KernelStatus {
            capture: self.capture(),
            attached: self.attached.clone(),
            pin_dir: self.pin_dir.clone(),
            enrolled: st.enrolled.clone(),
            enrolled_in_kernel: st.maps.netns.keys().flatten().count(),
            adopted: self.adopted,
            services,
            counters,
        }
    }
}

fn remove_backends(maps: &mut Maps, base: u32, count: usize) {
    for i in 0..count {
        let _ = maps.backends.remove(&NpBackendKey {
            base,
            index: i as u32,
        });
    }
}

impl Kernel {
    /// A successor has taken the kernel state over: from now on this instance leaves the maps
    /// alone (its successor writes them), `false` undoes it (the successor gave up).
    pub fn set_handed_over(&self, yes: bool) {
        self.handed_over
            .store(yes, std::sync::atomic::Ordering::SeqCst);
    }

    /// See [`Kernel::set_handed_over`].
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The pin directory's locked descriptor (passed to a successor).
    pub fn lock_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self._lock.fd()
    }

    /// Whether the maps were adopted from a predecessor.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Remove every pin: programs detach (their links go with their pins), maps go once the
    /// last descriptor (this process's) closes.
    pub fn uninstall(&self) -> Result<(), Error> {
        remove_pins(&self.pin_dir)
    }
}

/// `nodeproxy uninstall`: take the pin directory's lock (refused while an instance runs) and
/// remove every pin under it, detaching the programs. Returns whether there was anything.
pub fn uninstall(bpffs: &Path) -> Result<bool, Error> {
    let dir = Kernel::pin_dir_of(bpffs);
    if !dir.exists() {
        return Ok(false);
    }
    let _lock = pinlock::PinLock::acquire(&dir)?;
    remove_pins(&dir)?;
    Ok(true)
}

fn remove_pins(dir: &Path) -> Result<(), Error> {
    // Links first: the programs stop before the maps they use go.
    for sub in [dir.join(links::LINKS_DIR), dir.to_path_buf()] {
        match std::fs::remove_dir_all(&sub) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Bpffs { path: sub, source }),
        }
    }
    tracing::info!(dir = %dir.display(), "eBPF programs detached and pins removed");
    Ok(())
}

/// Log kernel events from the ring buffer until the task is dropped.
#[allow(unsafe_code)]
pub async fn spawn_events(ring: RingBuf<MapData>) {
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the RingBuf (owned
    // by the AsyncFd) is dropped.
    let Ok(mut fd) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<abi::NpEvent>() {
                // Copy the record into an aligned value.
                let mut ev = abi::NpEvent::default();
                let bytes: &[u8] = &item;
                let ev_bytes = bytes_of_mut(&mut ev);
                ev_bytes.copy_from_slice(&bytes[..ev_bytes.len()]);
                let reason = REASONS
                    .get(ev.reason as usize)
                    .copied()
                    .unwrap_or("unknown");
                tracing::warn!(reason, pid = ev.pid, netns = ev.netns_cookie, orig = ?ev.orig.to_socket(), "kernel event");
            }
        }
        guard.clear_ready();
    }
}

fn bytes_of_mut(ev: &mut abi::NpEvent) -> &mut [u8] {
    abi::event_bytes_mut(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program passes the verifier and attaches; maps are pinned, then removed on drop.
    #[test]
    fn programs_load_attach_and_clean_up() {
        if !crate::test_util::require_root("programs_load_attach_and_clean_up") {
            return;
        }
        let opts = Options {
            capture: "127.0.0.1:15001".parse().unwrap(),
            capture_alt: None,
            enroll: vec![PathBuf::from("/proc/self/ns/net")],
            uplinks: Vec::new(),
            guard_ports: Vec::new(),
            deny_cidrs: Vec::new(),
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            sockmap: true,
        };
        let load = |opts: &Options| {
            Kernel::lock(opts)
                .and_then(|lock| Kernel::load(opts, lock, &Snapshot::default()))
                .unwrap_or_else(|e| panic!("{e:#}: {:?}", std::error::Error::source(&e)))
        };
        let _ = uninstall(Path::new(DEFAULT_BPFFS));
        let k = load(&opts);
        let maps = Path::new("/sys/fs/bpf/nodeproxy").join(format!("maps-{MAP_ABI}"));
        assert!(maps.join("np_svc").exists(), "shared maps are pinned");
        assert!(!k.adopted());
        let st = k.status();
        assert_eq!(st.attached.len(), 5, "{:?}", st.attached);
        // cgroup/getsockopt answers SO_ORIGINAL_DST for a peer the 4-tuple map knows.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, peer) = l.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let orig: std::net::SocketAddr = "10.96.7.7:8080".parse().unwrap();
        k.remember_orig_dst(peer, orig).unwrap();
        assert_eq!(
            netns::original_dst(&accepted).expect("SO_ORIGINAL_DST"),
            orig
        );
        assert_eq!(k.take_orig_dst(peer), Some(orig));
        assert_eq!(k.take_orig_dst(peer), None, "taken entries are deleted");
        assert_eq!(st.enrolled.len(), 1);
        assert!(k.unenroll(Path::new("/proc/self/ns/net")).unwrap());
        k.enroll(Path::new("/proc/self/ns/net")).unwrap();
        assert!(
            matches!(Kernel::lock(&opts), Err(Error::PinLock(_))),
            "one instance per pin directory"
        );
        drop(k);
        // The programs and maps outlive the process's handles; the next load adopts them and
        // swaps its programs into the pinned links.
        let links = Path::new("/sys/fs/bpf/nodeproxy/links");
        assert!(links.join("np_connect4").exists(), "links are pinned");
        assert!(maps.join("np_netns").exists(), "maps stay after drop");
        let k = load(&opts);
        assert!(k.adopted(), "a second load adopts the pinned maps");
        let st = k.status();
        assert!(
            st.attached
                .iter()
                .all(|a| a.contains("updated in place") || a.starts_with("np_sk_msg")),
            "{:?}",
            st.attached
        );
        let cookie = st.enrolled[Path::new("/proc/self/ns/net")];
        drop(k);
        // Maps of another ABI (as an upgrade that changed a map leaves them): fresh maps are
        // made and filled, the programs swapped in, the enrollments carried over, the old
        // maps removed.
        let old = Path::new("/sys/fs/bpf/nodeproxy/maps-0ldab1");
        std::fs::rename(&maps, old).unwrap();
        let mut no_enroll = opts.clone();
        no_enroll.enroll.clear();
        let k = load(&no_enroll);
        assert!(!k.adopted(), "maps of another ABI are not adopted");
        assert!(
            !old.exists(),
            "the old maps are removed once the programs use the new ones"
        );
        assert!(maps.join("np_netns").exists());
        let st = k.status();
        assert_eq!(st.enrolled_in_kernel, 1, "the enrollment is carried over");
        assert!(
            st.attached.iter().any(|a| a.contains("updated in place")),
            "{:?}",
            st.attached
        );
        assert_eq!(k.enroll(Path::new("/proc/self/ns/net")).unwrap(), cookie);
        k.uninstall().unwrap();
        assert!(
            !Path::new("/sys/fs/bpf/nodeproxy").exists(),
            "uninstall removes every pin"
        );
    }
}
