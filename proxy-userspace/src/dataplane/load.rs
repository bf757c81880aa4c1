//! Loading the eBPF programs: bpffs mounted, the pin directory claimed, the object loaded with
//! its globals, programs attached, maps pinned.

use super::*;

impl Kernel {
    /// The pin directory under a bpffs mount.
    pub fn pin_dir_of(bpffs: &Path) -> PathBuf {
        bpffs.join("nodeproxy")
    }

    /// What must hold before anything is loaded: root, cgroup v2, bpffs mounted; then the pin
    /// directory's lock (one instance per pin directory: taken before anything in it is
    /// touched; a busy lock is [`Error::PinLock`], which the caller may turn into a takeover).
    pub fn lock(opts: &Options) -> Result<pinlock::PinLock, Error> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        cgroup2_root().ok_or(Error::NoCgroup2)?;
        ensure_bpffs(&opts.bpffs)?;
        Ok(pinlock::PinLock::acquire(&Self::pin_dir_of(&opts.bpffs))?)
    }

    /// Load the programs, adopt the pinned maps when a predecessor built from the same map
    /// headers left them (else create them), fill the service map from `snap`, enroll the
    /// configured namespaces, and only then put the programs in place: swapped into the pinned
    /// links (no moment without a program, never two of ours), or attached and pinned.
    pub fn load(opts: &Options, lock: pinlock::PinLock, snap: &Snapshot) -> Result<Kernel, Error> {
        let cgroup = cgroup2_root().ok_or(Error::NoCgroup2)?;
        let pin_dir = Self::pin_dir_of(&opts.bpffs);
        let maps_dir = pin_dir.join(format!("maps-{}", MAP_ABI));
        let bpffs_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Bpffs { path, source }
        };
        let older = prepare_pin_dir(&pin_dir, &maps_dir).map_err(bpffs_err(&pin_dir))?;
        let adopted = maps_dir.join("np_svc").exists();
        std::fs::create_dir_all(&maps_dir).map_err(bpffs_err(&maps_dir))?;
        let globals = Globals::new(opts);
        let mut connect = load_shared(CONNECT_OBJ, "connect.bpf.o", &maps_dir, &globals)?;
        let mut sockops = load_shared(SOCKOPS_OBJ, "sockops.bpf.o", &maps_dir, &globals)?;
        // getsockopt(SO_ORIGINAL_DST) for tools that ask the standard way; shares the pinned maps.
        let mut getsockopt = load_shared(GETSOCKOPT_OBJ, "getsockopt.bpf.o", &maps_dir, &globals)?;
        load_program::<CgroupSockAddr>(&mut connect, "np_connect4")?;
        load_program::<CgroupSockAddr>(&mut connect, "np_connect6")?;
        load_program::<SockOps>(&mut sockops, "np_sockops")?;
        load_program::<CgroupSockopt>(&mut getsockopt, "np_getsockopt")?;
        let mut skmsg = None;
        let mut splice = None;
        if opts.sockmap {
            let mut obj = load_shared(SK_MSG_OBJ, "sk_msg.bpf.o", &maps_dir, &globals)?;
            load_program::<SkMsg>(&mut obj, "np_sk_msg")?;
            splice = Some(Splice {
                sock_hash: Mutex::new(
                    aya::maps::SockHash::try_from(take_map(&mut obj, "np_sock_hash")?)
                        .map_err(map_err("np_sock_hash", "open"))?,
                ),
                upstream: BpfHashMap::try_from(take_map(&mut sockops, "np_upstream")?)
                    .map_err(map_err("np_upstream", "open"))?,
            });
            skmsg = Some(obj);
        }
        let (mut xdp, xdp_counters) = match opts.uplinks.is_empty() {
            true => (None, None),
            false => {
                let (obj, counters) = load_xdp(opts)?;
                (Some(obj), Some(counters))
            }
        };
        let maps = Maps {
            svc: BpfHashMap::try_from(take_map(&mut connect, "np_svc")?)
                .map_err(map_err("np_svc", "open"))?,
            backends: BpfHashMap::try_from(take_map(&mut connect, "np_backends")?)
                .map_err(map_err("np_backends", "open"))?,
            netns: BpfHashMap::try_from(take_map(&mut connect, "np_netns")?)
                .map_err(map_err("np_netns", "open"))?,
            orig_tuple: BpfHashMap::try_from(take_map(&mut connect, "np_orig_tuple")?)
                .map_err(map_err("np_orig_tuple", "open"))?,
            counters: PerCpuArray::try_from(take_map(&mut connect, "np_counters")?)
                .map_err(map_err("np_counters", "open"))?,
            xdp_counters,
        };
        let mut kernel = Kernel {
            state: Mutex::new(State {
                maps,
                installed: BTreeMap::new(),
                next_base: 1,
                enrolled: BTreeMap::new(),
            }),
            _objects: Vec::new(),
            pin_dir: pin_dir.clone(),
            captures: std::iter::once(opts.capture)
                .chain(opts.capture_alt)
                .collect(),
            attached: Vec::new(),
            adopted,
            splice,
            handed_over: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        };
        if adopted {
            kernel.adopt_tables();
        } else {
            kernel.carry_over(&older, "np_netns");
        }
        // Nothing published yet (the Kubernetes source fills the first snapshot later): the
        // adopted table stays as it is until then, rather than being emptied.
        if snap.version > 0 {
            kernel.sync(snap)?;
        }
        for p in &opts.enroll {
            kernel.enroll(p)?;
        }
        // The tables are ready: now the programs go in.
        let cgroup_file = std::fs::File::open(&cgroup).map_err(|source| Error::Io {
            what: format!("open cgroup {}", cgroup.display()),
            source,
        })?;
        let mut links = Vec::new();
        let mut attach = |name, how: links::How, target: String| {
            let verb = if how == links::How::Updated {
                "updated in place"
            } else {
                "attached"
            };
            kernel.attached.push(format!("{name} -> {target} ({verb})"));
        };
        let cg = cgroup.display().to_string();
        use links::attach_type as at;
        for (name, ty) in [
            ("np_connect4", at::CGROUP_INET4_CONNECT),
            ("np_connect6", at::CGROUP_INET6_CONNECT),
        ] {
            let path = links::link_path(&pin_dir, name, None);
            let how =
                install_cgroup::<CgroupSockAddr>(&mut connect, name, ty, &path, &cgroup_file)?;
            links.push(path);
            attach(name, how, format!("cgroup {cg}"));
        }
        let path = links::link_path(&pin_dir, "np_sockops", None);
        let how = install_cgroup::<SockOps>(
            &mut sockops,
            "np_sockops",
            at::CGROUP_SOCK_OPS,
            &path,
            &cgroup_file,
        )?;
        links.push(path);
        attach("np_sockops", how, format!("cgroup {cg}"));
        let path = links::link_path(&pin_dir, "np_getsockopt", None);
        let how = install_cgroup::<CgroupSockopt>(
            &mut getsockopt,
            "np_getsockopt",
            at::CGROUP_GETSOCKOPT,
            &path,
            &cgroup_file,
        )?;
        links.push(path);
        attach("np_getsockopt", how, format!("cgroup {cg}"));
        if let (Some(obj), Some(s)) = (&mut skmsg, &kernel.splice) {
            attach_sk_msg(obj, s)?;
            attach("np_sk_msg", links::How::Attached, "np_sock_hash".into());
        }
        if let Some(obj) = &mut xdp {
            for iface in &opts.uplinks {
                let path = links::link_path(&pin_dir, "np_xdp_guard", Some(iface));
                let how = install_xdp(obj, iface, &path)?;
                links.push(path);
                attach("np_xdp_guard", how, iface.clone());
            }
        }
        links::prune(&pin_dir, &links);
        if !older.is_empty() {
            // The programs now use this run's maps; connections captured just before the
            // switch still have their original destination in the old ones.
            kernel.carry_over(&older, "np_orig_tuple");
            for dir in &older {
                match std::fs::remove_dir_all(dir) {
                    Ok(()) => tracing::info!(dir = %dir.display(), "maps of an older ABI removed"),
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "remove old maps"),
                }
            }
        }
        kernel._objects.extend(
            [Some(connect), Some(sockops), Some(getsockopt), skmsg, xdp]
                .into_iter()
                .flatten(),
        );
        tracing::info!(capture = %opts.capture, adopted, programs = ?kernel.attached, "eBPF data path in place");
        Ok(kernel)
    }

    /// Maps adopted from a predecessor: what their service map holds becomes this run's
    /// record (so the first sync replaces or removes every entry, endpoints written before
    /// the switch), and endpoint entries no service points at (a sync cut short by a kill)
    /// are removed.
    fn adopt_tables(&mut self) {
        let st = self.state.get_mut().expect("kernel lock");
        let mut bases = std::collections::BTreeSet::new();
        for (addr, val) in st.maps.svc.iter().flatten() {
            let Some(a) = addr.to_socket() else { continue };
            bases.insert(val.backend_base);
            st.next_base = st.next_base.max(val.backend_base.wrapping_add(1).max(1));
            st.installed.insert(
                a,
                Installed {
                    svc: None,
                    base: val.backend_base,
                    count: val.backend_count as usize,
                },
            );
        }
        let orphans: Vec<NpBackendKey> = st
            .maps
            .backends
            .keys()
            .flatten()
            .filter(|k| !bases.contains(&k.base))
            .collect();
        for k in &orphans {
            let _ = st.maps.backends.remove(k);
        }
        let enrolled = st.maps.netns.keys().flatten().count();
        tracing::info!(
            services = st.installed.len(),
            orphans = orphans.len(),
            enrolled,
            "adopted the pinned maps of a predecessor"
        );
    }

    /// Copy the entries of `name` from maps of an older ABI into this run's, where the key and
    /// value layouts still match (enrollments survive an upgrade that changed other maps).
    fn carry_over(&mut self, older: &[PathBuf], name: &'static str) {
        let st = self.state.get_mut().expect("kernel lock");
        let copied = match name {
            "np_netns" => copy_entries::<u64, u32>(older, name, &mut st.maps.netns),
            _ => copy_entries::<NpAddr, NpAddr>(older, name, &mut st.maps.orig_tuple),
        };
        if copied > 0 {
            tracing::info!(
                map = name,
                entries = copied,
                "carried over from maps of an older ABI"
            );
        }
    }
}

fn copy_entries<K: aya::Pod, V: aya::Pod>(
    older: &[PathBuf],
    name: &str,
    into: &mut BpfHashMap<MapData, K, V>,
) -> usize {
    let mut n = 0;
    for dir in older {
        let Ok(old) = MapData::from_pin(dir.join(name))
            .and_then(aya::maps::Map::from_map_data)
            .and_then(BpfHashMap::<_, K, V>::try_from)
        else {
            continue;
        };
        for (k, v) in old.iter().flatten() {
            n += usize::from(into.insert(k, v, 0).is_ok());
        }
    }
    n
}

/// Keep the lock's directory, this ABI's maps and the links; remove pins of an older layout
/// (plain files at the top); return the map directories of other ABIs (to carry over from and
/// remove once this run's programs are in place).
fn prepare_pin_dir(pin_dir: &Path, maps_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut older = Vec::new();
    for entry in std::fs::read_dir(pin_dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path == maps_dir || name == links::LINKS_DIR {
            continue;
        }
        if name.starts_with("maps-") && path.is_dir() {
            older.push(path);
        } else if std::fs::symlink_metadata(&path)?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(older)
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    bpf.take_map(name).ok_or(Error::Missing(name))
}

/// Find a program by name, as its type.
fn find_program<'a, P>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(Error::Missing(name))?
        .try_into()
        .map_err(|source| Error::Program {
            action: "find".into(),
            name,
            source,
        })
}

fn prog_err(
    action: impl Into<String>,
    name: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    let action = action.into();
    move |source| Error::Program {
        action,
        name,
        source,
    }
}

/// The program operations loading and attaching need, for each program type used.
trait Prog {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn prog_fd(&self) -> Result<std::os::fd::OwnedFd, Error>;
}

macro_rules! prog {
    ($($ty:ty),*) => {$(
        impl Prog for $ty {
            fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
            fn prog_fd(&self) -> Result<std::os::fd::OwnedFd, Error> {
                use std::os::fd::AsFd;
                let fd = self.fd().map_err(prog_err("get the descriptor of", "program"))?;
                fd.as_fd().try_clone_to_owned().map_err(|source| Error::Io {
                    what: "dup a program descriptor".into(),
                    source,
                })
            }
        }
    )*};
}
prog!(CgroupSockAddr, SockOps, CgroupSockopt, SkMsg, Xdp);

fn load_program<'a, P: Prog + 'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<(), Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    find_program::<P>(bpf, name)?
        .load_it()
        .map_err(prog_err("load", name))
}

/// A program at the root cgroup through its pinned link.
fn install_cgroup<'a, P: Prog + 'a>(
    bpf: &'a mut Ebpf,
    name: &'static str,
    attach_type: u32,
    path: &Path,
    cgroup: &std::fs::File,
) -> Result<links::How, Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    use std::os::fd::{AsFd, AsRawFd};
    let fd = find_program::<P>(bpf, name)?.prog_fd()?;
    links::install(path, name, fd.as_fd(), || {
        links::link_create(fd.as_fd(), cgroup.as_raw_fd() as u32, attach_type)
    })
}

fn install_xdp(bpf: &mut Ebpf, iface: &str, path: &Path) -> Result<links::How, Error> {
    use std::os::fd::AsFd;
    let name = "np_xdp_guard";
    let fd = find_program::<Xdp>(bpf, name)?.prog_fd()?;
    let index = nix::net::if_::if_nametoindex(iface).map_err(|e| Error::Io {
        what: format!("XDP guard: interface {iface}"),
        source: e.into(),
    })?;
    links::install(path, name, fd.as_fd(), || {
        links::link_create(fd.as_fd(), index, links::attach_type::XDP)
    })
}

/// sk_msg attaches to the pinned sockhash itself (no link): attaching replaces a
/// predecessor's program atomically, and the map keeps it attached after this process exits.
fn attach_sk_msg(bpf: &mut Ebpf, s: &Splice) -> Result<(), Error> {
    let name = "np_sk_msg";
    let prog = find_program::<SkMsg>(bpf, name)?;
    let fd = s
        .sock_hash
        .lock()
        .expect("sock hash lock")
        .fd()
        .try_clone()
        .map_err(|source| Error::Io {
            what: "dup np_sock_hash fd".into(),
            source,
        })?;
    let id = prog
        .attach(&fd)
        .map_err(prog_err("attach to np_sock_hash", name))?;
    // Dropping the link would detach the program at exit: it stays with the map instead.
    let link = prog
        .take_link(id)
        .map_err(prog_err("attach to np_sock_hash", name))?;
    std::mem::forget(link);
    Ok(())
}

/// The XDP guard's object, its port and deny tables filled, and its counters.
fn load_xdp(opts: &Options) -> Result<(Ebpf, PerCpuArray<MapData, u64>), Error> {
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
    load_program::<Xdp>(&mut xdp, "np_xdp_guard")?;
    let counters = PerCpuArray::try_from(take_map(&mut xdp, "np_xdp_counters")?)
        .map_err(map_err("np_xdp_counters", "open"))?;
    Ok((xdp, counters))
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

/// Load-time settings of the socket programs (`volatile const` globals).
pub(super) struct Globals {
    ip4: u32,
    port: u32,
    ip6: [u32; 4],
    sockmap: u32,
}

impl Globals {
    fn new(opts: &Options) -> Globals {
        let (mut ip4, mut ip6) = (0, [0u32; 4]);
        for a in std::iter::once(opts.capture).chain(opts.capture_alt) {
            match a.ip() {
                IpAddr::V4(v4) => ip4 = u32::from_ne_bytes(v4.octets()),
                IpAddr::V6(_) => ip6 = NpAddr::from_socket(a).addr,
            }
        }
        Globals {
            ip4,
            port: opts.capture.port().to_be() as u32,
            ip6,
            sockmap: opts.sockmap as u32,
        }
    }
}

/// Load a socket object whose maps are shared through pins in `maps_dir`.
pub(super) fn load_shared(
    obj: &'static [u8],
    object: &'static str,
    maps_dir: &Path,
    g: &Globals,
) -> Result<Ebpf, Error> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .override_global("np_capture_ip4", &g.ip4, true)
        .override_global("np_capture_port", &g.port, true)
        .override_global("np_capture_ip6", &g.ip6, true)
        .override_global("np_sockmap", &g.sockmap, true)
        .load(obj)
        .map_err(|source| Error::Load { object, source })
}
