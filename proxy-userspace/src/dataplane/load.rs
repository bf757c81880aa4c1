//! Loading the eBPF programs: bpffs mounted, the pin directory claimed, the object loaded with
//! its globals, programs attached, maps pinned.

use super::*;

impl Kernel {
    /// Load, attach, and enroll the configured namespaces.
    pub fn load(opts: &Options) -> Result<Kernel, Error> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        let cgroup = cgroup2_root().ok_or(Error::NoCgroup2)?;
        ensure_bpffs(&opts.bpffs)?;
        let pin_dir = opts.bpffs.join("nodeproxy");
        // One instance per pin directory: lock before touching anything in it.
        let lock = pinlock::PinLock::acquire(&pin_dir)?;
        // Pins left by a predecessor that was killed: remove before loading, so no stale entry
        // (services, original destinations) survives into this run. The directory itself
        // stays: it is what the lock is held on.
        clear_dir(&pin_dir).map_err(|source| Error::Bpffs {
            path: pin_dir.clone(),
            source,
        })?;
        let (mut ip4, mut ip6) = (0, [0u32; 4]);
        for a in std::iter::once(opts.capture).chain(opts.capture_alt) {
            match a.ip() {
                IpAddr::V4(v4) => ip4 = u32::from_ne_bytes(v4.octets()),
                IpAddr::V6(_) => ip6 = NpAddr::from_socket(a).addr,
            }
        }
        let port = opts.capture.port().to_be() as u32;
        let globals = Globals {
            ip4,
            port,
            ip6,
            sockmap: opts.sockmap as u32,
        };
        let mut connect = load_shared(CONNECT_OBJ, "connect.bpf.o", &pin_dir, &globals)?;
        let mut sockops = load_shared(SOCKOPS_OBJ, "sockops.bpf.o", &pin_dir, &globals)?;
        // getsockopt(SO_ORIGINAL_DST) for tools that ask the standard way; shares the pinned maps.
        let mut getsockopt = load_shared(GETSOCKOPT_OBJ, "getsockopt.bpf.o", &pin_dir, &globals)?;
        let cgroup_file = std::fs::File::open(&cgroup).map_err(|source| Error::Io {
            what: format!("open cgroup {}", cgroup.display()),
            source,
        })?;
        let mut attached = Vec::new();
        // Single: aya 0.14's AllowMultiple fails with EINVAL (aya issue 1078); an existing foreign
        // program at the root makes this fail rather than replacing it.
        // Find a program by name, as its type, and load it into the kernel.
        macro_rules! program {
            ($bpf:expr, $ty:ty, $name:expr) => {{
                let name: &'static str = $name;
                let prog: &mut $ty = $bpf
                    .program_mut(name)
                    .ok_or(Error::Missing(name))?
                    .try_into()
                    .map_err(|source| Error::Program {
                        action: "find".into(),
                        name,
                        source,
                    })?;
                prog.load().map_err(|source| Error::Program {
                    action: "load".into(),
                    name,
                    source,
                })?;
                prog
            }};
        }
        macro_rules! attach_cgroup {
            ($bpf:expr, $ty:ty, $name:expr) => {{
                let name: &'static str = $name;
                let prog = program!($bpf, $ty, name);
                prog.attach(&cgroup_file, CgroupAttachMode::Single)
                    .map_err(|source| Error::Program {
                        action: format!("attach to cgroup {}", cgroup.display()),
                        name,
                        source,
                    })?;
                attached.push(format!("{name} -> cgroup {}", cgroup.display()));
            }};
        }
        attach_cgroup!(connect, CgroupSockAddr, "np_connect4");
        attach_cgroup!(connect, CgroupSockAddr, "np_connect6");
        attach_cgroup!(sockops, SockOps, "np_sockops");
        attach_cgroup!(getsockopt, CgroupSockopt, "np_getsockopt");
        let mut objects = vec![getsockopt];
        let mut splice = None;
        if opts.sockmap {
            let mut skmsg = load_shared(SK_MSG_OBJ, "sk_msg.bpf.o", &pin_dir, &globals)?;
            let hash: aya::maps::SockHash<MapData, abi::NpSockKey> = aya::maps::SockHash::try_from(
                skmsg
                    .take_map("np_sock_hash")
                    .ok_or(Error::Missing("np_sock_hash"))?,
            )
            .map_err(map_err("np_sock_hash", "open"))?;
            let name = "np_sk_msg";
            let prog = program!(skmsg, SkMsg, name);
            let fd = hash.fd().try_clone().map_err(|source| Error::Io {
                what: "dup np_sock_hash fd".into(),
                source,
            })?;
            prog.attach(&fd).map_err(|source| Error::Program {
                action: "attach to np_sock_hash".into(),
                name,
                source,
            })?;
            attached.push(format!("{name} -> np_sock_hash"));
            objects.push(skmsg);
            splice = Some(Splice {
                sock_hash: Mutex::new(hash),
                upstream: BpfHashMap::try_from(
                    sockops
                        .take_map("np_upstream")
                        .ok_or(Error::Missing("np_upstream"))?,
                )
                .map_err(map_err("np_upstream", "open"))?,
            });
        }
        let mut xdp_counters = None;
        if !opts.uplinks.is_empty() {
            let mut xdp = EbpfLoader::new()
                .load(XDP_OBJ)
                .map_err(|source| Error::Load {
                    object: "xdp_guard.bpf.o",
                    source,
                })?;
            {
                let mut ports: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(
                    xdp.map_mut("np_xdp_ports")
                        .ok_or(Error::Missing("np_xdp_ports"))?,
                )
                .map_err(map_err("np_xdp_ports", "open"))?;
                for p in &opts.guard_ports {
                    ports
                        .insert(p.to_be(), 1, 0)
                        .map_err(map_err("np_xdp_ports", format!("insert {p}")))?;
                }
            }
            {
                let mut deny: LpmTrie<_, u32, u8> = LpmTrie::try_from(
                    xdp.map_mut("np_xdp_deny4")
                        .ok_or(Error::Missing("np_xdp_deny4"))?,
                )
                .map_err(map_err("np_xdp_deny4", "open"))?;
                for net in &opts.deny_cidrs {
                    let key = aya::maps::lpm_trie::Key::new(
                        net.prefix_len() as u32,
                        u32::from_ne_bytes(net.network().octets()),
                    );
                    deny.insert(&key, 1, 0)
                        .map_err(map_err("np_xdp_deny4", format!("insert {net}")))?;
                }
            }
            let name = "np_xdp_guard";
            let prog = program!(xdp, Xdp, name);
            for iface in &opts.uplinks {
                prog.attach(iface, XdpMode::default())
                    .map_err(|source| Error::Program {
                        action: format!("attach to interface {iface}"),
                        name,
                        source,
                    })?;
                attached.push(format!("{name} -> {iface}"));
            }
            xdp_counters = Some(
                PerCpuArray::try_from(
                    xdp.take_map("np_xdp_counters")
                        .ok_or(Error::Missing("np_xdp_counters"))?,
                )
                .map_err(map_err("np_xdp_counters", "open"))?,
            );
            objects.push(xdp);
        }
        let take =
            |bpf: &mut Ebpf, name: &'static str| bpf.take_map(name).ok_or(Error::Missing(name));
        let maps = Maps {
            svc: BpfHashMap::try_from(take(&mut connect, "np_svc")?)
                .map_err(map_err("np_svc", "open"))?,
            backends: BpfHashMap::try_from(take(&mut connect, "np_backends")?)
                .map_err(map_err("np_backends", "open"))?,
            netns: BpfHashMap::try_from(take(&mut connect, "np_netns")?)
                .map_err(map_err("np_netns", "open"))?,
            orig_tuple: BpfHashMap::try_from(take(&mut connect, "np_orig_tuple")?)
                .map_err(map_err("np_orig_tuple", "open"))?,
            counters: PerCpuArray::try_from(take(&mut connect, "np_counters")?)
                .map_err(map_err("np_counters", "open"))?,
            xdp_counters,
        };
        objects.push(connect);
        objects.push(sockops);
        let kernel = Kernel {
            state: Mutex::new(State {
                maps,
                installed: BTreeMap::new(),
                next_base: 1,
                enrolled: BTreeMap::new(),
            }),
            _objects: objects,
            pin_dir,
            captures: std::iter::once(opts.capture)
                .chain(opts.capture_alt)
                .collect(),
            attached,
            splice,
            _lock: lock,
        };
        for p in &opts.enroll {
            kernel.enroll(p)?;
        }
        tracing::info!(capture = %opts.capture, programs = ?kernel.attached, "eBPF data path attached");
        Ok(kernel)
    }
}

pub(super) fn is_bpffs(path: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, p, kind) = (f.next(), f.next(), f.next());
            kind == Some("bpf") && p.map(Path::new) == Some(path)
        })
    })
}

pub(super) fn ensure_bpffs(path: &Path) -> Result<(), Error> {
    if is_bpffs(path) {
        return Ok(());
    }
    let err = |source| Error::Bpffs {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| err(std::io::Error::from(e)))
}

/// Remove everything inside `dir`, keeping `dir`.
pub(super) fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Load-time settings of the socket programs (`volatile const` globals).
pub(super) struct Globals {
    ip4: u32,
    port: u32,
    ip6: [u32; 4],
    sockmap: u32,
}

/// Load a socket object whose maps are shared through pins in `pin_dir`.
pub(super) fn load_shared(
    obj: &'static [u8],
    object: &'static str,
    pin_dir: &Path,
    g: &Globals,
) -> Result<Ebpf, Error> {
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global("np_capture_ip4", &g.ip4, true)
        .override_global("np_capture_port", &g.port, true)
        .override_global("np_capture_ip6", &g.ip6, true)
        .override_global("np_sockmap", &g.sockmap, true)
        .load(obj)
        .map_err(|source| Error::Load { object, source })
}
