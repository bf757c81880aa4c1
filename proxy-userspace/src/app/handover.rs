//! Takeover: a new `nodeproxy run` on a pin directory another instance holds takes that
//! instance's place without a refused connection (HAProxy's `-x`, Envoy's hot restart).
//!
//! The instance holding the pin directory listens on the abstract unix socket
//! `nodeproxy-handover:<pin dir>` (SOCK_SEQPACKET; abstract, so nothing is left on disk). Any
//! user can bind an abstract name, so both ends check the other's uid (SO_PEERCRED) against
//! their own, and a successor checks that each socket passed is a TCP socket listening on the
//! address it is passed for. A successor:
//! 1. connects and asks (`{"version":1,"pid":N}`);
//! 2. receives, with SCM_RIGHTS, the locked descriptor of the pin directory (the lock is
//!    shared from then on and passes to it when the old process exits) and every listening
//!    socket with its address (in batches of at most [`BATCH`]). The old instance stops
//!    writing the kernel maps and closes its end of the abstract name;
//! 3. adopts the pinned maps, swaps its programs into the pinned links, binds nothing it
//!    inherited, and once its data plane serves, sends `ready`;
//! 4. the old instance stops accepting (the sockets, and their queues, are the successor's
//!    alone), drains, and exits. If the successor goes away before `ready`, the old instance
//!    takes the maps back, re-syncs them and listens for the next successor.
//!
//! Connection pools, circuit-breaker counts and outlier ejections are not handed over: the
//! successor starts them fresh (an ejected endpoint is tried again by its first requests).

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

use crate::dataplane::Kernel;
use crate::dataplane::pinlock::PinLock;
use crate::sockets::Sockets;

/// Descriptors per message (the kernel's limit per SCM_RIGHTS message is 253).
pub const BATCH: usize = 200;
/// How long the old instance waits for its successor's `ready`.
const READY_WAIT: Duration = Duration::from_secs(300);
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Request {
    version: u32,
    pid: u32,
}

/// One batch of descriptors: the first batch's first descriptor is the lock, then one
/// listening socket per address, in order.
#[derive(Serialize, Deserialize)]
struct Batch {
    pid: u32,
    sockets: Vec<SocketAddr>,
    last: bool,
}

fn name(pin_dir: &Path) -> anyhow::Result<UnixAddr> {
    let n = format!("nodeproxy-handover:{}", pin_dir.display());
    UnixAddr::new_abstract(n.as_bytes()).context("abstract socket name")
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn recv_timeout(fd: &OwnedFd, d: Duration) -> nix::Result<()> {
    socket::setsockopt(
        fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(d.as_secs() as i64, d.subsec_micros() as i64),
    )
}

/// What a successor received besides the lock.
pub struct Taken {
    /// Listening sockets by address.
    pub sockets: Vec<(SocketAddr, OwnedFd)>,
    /// The predecessor's pid.
    pub from: u32,
    conn: OwnedFd,
}

impl Taken {
    /// Tell the predecessor this process serves: it stops accepting and drains.
    pub fn ready(self) -> anyhow::Result<u32> {
        socket::send(self.conn.as_raw_fd(), b"ready", MsgFlags::empty())
            .context("tell the predecessor this instance is ready")?;
        Ok(self.from)
    }
}

/// Ask the instance holding `pin_dir` for its lock and sockets.
pub fn take_over(pin_dir: &Path, holder: Option<u32>) -> anyhow::Result<(PinLock, Taken)> {
    let holder = holder.map(|p| format!(" (pid {p})")).unwrap_or_default();
    let conn = seqpacket().context("handover socket")?;
    if let Err(e) = socket::connect(conn.as_raw_fd(), &name(pin_dir)?) {
        bail!(
            "another nodeproxy{holder} holds the pin directory {} and does not answer a takeover ({e}): it is an older version or is handing over already; stop it first, or give this one another --bpffs",
            pin_dir.display()
        );
    }
    // Any user may bind an abstract name: only a peer of this process's uid is a nodeproxy
    // whose sockets and lock may be taken.
    let cred = socket::getsockopt(&conn, sockopt::PeerCredentials)?;
    if cred.uid() != nix::unistd::geteuid().as_raw() {
        bail!(
            "the handover socket of {} is held by pid {} of uid {}, not by a nodeproxy of this user: refusing to take anything from it (the pin directory is held{holder}; stop that instance first)",
            pin_dir.display(),
            cred.pid(),
            cred.uid()
        );
    }
    recv_timeout(&conn, Duration::from_secs(30))?;
    let req = serde_json::to_vec(&Request {
        version: VERSION,
        pid: std::process::id(),
    })?;
    socket::send(conn.as_raw_fd(), &req, MsgFlags::empty()).context("ask for a takeover")?;
    let (mut lock, mut sockets) = (None, Vec::new());
    let mut from;
    loop {
        let (bytes, fds) = recv_with_fds(&conn).with_context(|| {
            format!(
                "the instance{holder} holding {} refused or failed the takeover",
                pin_dir.display()
            )
        })?;
        let batch: Batch = serde_json::from_slice(&bytes).context("takeover reply")?;
        let mut fds = fds.into_iter();
        if lock.is_none() {
            let fd = fds.next().context("takeover reply without the lock")?;
            lock = Some(PinLock::inherit(fd, pin_dir)?);
        }
        from = batch.pid;
        if fds.len() != batch.sockets.len() {
            bail!(
                "takeover reply: {} sockets named, {} passed",
                batch.sockets.len(),
                fds.len()
            );
        }
        for (addr, fd) in batch.sockets.into_iter().zip(fds) {
            check_listening(&fd, addr)?;
            sockets.push((addr, fd));
        }
        if batch.last {
            break;
        }
    }
    let lock = lock.context("takeover reply without the lock")?;
    Ok((
        lock,
        Taken {
            sockets,
            from,
            conn,
        },
    ))
}

/// A passed socket must be what it is said to be: a listening TCP socket bound to `addr`.
fn check_listening(fd: &OwnedFd, addr: SocketAddr) -> anyhow::Result<()> {
    let s = socket2::SockRef::from(fd);
    let bound = s.local_addr().ok().and_then(|a| a.as_socket());
    let tcp = s.r#type().ok() == Some(socket2::Type::STREAM);
    let listening = socket::getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
    if bound != Some(addr) || !tcp || !listening {
        bail!(
            "takeover reply: the socket passed for {addr} is not a TCP socket listening there (bound to {bound:?})"
        );
    }
    Ok(())
}

fn recv_with_fds(conn: &OwnedFd) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; BATCH + 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: descriptors received with SCM_RIGHTS are new in this process and owned
            // by nothing else.
            #[allow(unsafe_code)]
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        bail!("descriptors cut off (more than {BATCH} in one message)");
    }
    let n = msg.bytes;
    if n == 0 {
        bail!("connection closed");
    }
    buf.truncate(n);
    Ok((buf, fds))
}

/// The old instance's side: what it hands over and how it learns it is done.
pub struct Holder {
    /// The pin directory.
    pub pin_dir: std::path::PathBuf,
    /// Its kernel state (stops writing maps while a successor takes over).
    pub kernel: Arc<Kernel>,
    /// Its listening sockets.
    pub sockets: Arc<Sockets>,
    /// Re-sync the kernel maps (a successor gave up).
    pub resync: Box<dyn Fn() + Send>,
    /// Set to the successor's pid once it is ready.
    pub done: tokio::sync::watch::Sender<Option<u32>>,
}

/// Listen for a successor on a thread of its own, until one is ready.
pub fn serve(holder: Holder) -> anyhow::Result<()> {
    let addr = name(&holder.pin_dir)?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            loop {
                let listener = match bind_with_retry(&addr) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "handover socket: no takeover possible");
                        return;
                    }
                };
                match serve_one(&holder, listener) {
                    Ok(pid) => {
                        holder.done.send_replace(Some(pid));
                        return;
                    }
                    Err(e) => {
                        holder.kernel.set_handed_over(false);
                        (holder.resync)();
                        tracing::warn!(error = %format!("{e:#}"), "takeover did not complete; this instance serves on");
                    }
                }
            }
        })?;
    Ok(())
}

/// The name is free once the predecessor (if any) closed its end: at once, normally.
fn bind_with_retry(addr: &UnixAddr) -> anyhow::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        let fd = seqpacket()?;
        match socket::bind(fd.as_raw_fd(), addr) {
            Ok(()) => {
                socket::listen(&fd, Backlog::new(4)?)?;
                return Ok(fd);
            }
            Err(nix::errno::Errno::EADDRINUSE) if tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context("bind the handover socket"),
        }
    }
}

/// Serve one successor; `Ok(pid)` once it is ready.
fn serve_one(holder: &Holder, listener: OwnedFd) -> anyhow::Result<u32> {
    let conn = loop {
        let raw = socket::accept(listener.as_raw_fd()).context("accept")?;
        // SAFETY: accept returned a new descriptor owned by nothing else.
        #[allow(unsafe_code)]
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        let cred = socket::getsockopt(&conn, sockopt::PeerCredentials)?;
        if cred.uid() != nix::unistd::geteuid().as_raw() {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "takeover refused: another user"
            );
            continue;
        }
        break conn;
    };
    recv_timeout(&conn, Duration::from_secs(10))?;
    let mut buf = [0u8; 512];
    let n = socket::recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    let req: Request = serde_json::from_slice(&buf[..n]).context("takeover request")?;
    if req.version != VERSION {
        bail!(
            "takeover request of version {}: this instance speaks {VERSION}",
            req.version
        );
    }
    tracing::info!(
        successor = req.pid,
        "takeover requested: handing over the kernel state and the listening sockets"
    );
    holder.kernel.set_handed_over(true);
    let lock = holder.kernel.lock_fd().try_clone_to_owned()?;
    let sockets = holder.sockets.to_pass_on();
    let mut batches = sockets.chunks(BATCH).peekable();
    let mut first = true;
    loop {
        let chunk = batches.next().unwrap_or(&[]);
        let last = batches.peek().is_none();
        let batch = Batch {
            pid: std::process::id(),
            sockets: chunk.iter().map(|(a, _)| *a).collect(),
            last,
        };
        let mut fds: Vec<RawFd> = Vec::with_capacity(chunk.len() + 1);
        if std::mem::take(&mut first) {
            fds.push(lock.as_raw_fd());
        }
        fds.extend(chunk.iter().map(|(_, fd)| fd.as_fd().as_raw_fd()));
        let bytes = serde_json::to_vec(&batch)?;
        socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .context("pass the sockets on")?;
        if last {
            break;
        }
    }
    // The successor binds the name once ready.
    drop(listener);
    recv_timeout(&conn, READY_WAIT)?;
    let n = socket::recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty())
        .context("wait for the successor")?;
    if &buf[..n] != b"ready" {
        bail!("successor (pid {}) went away before it was ready", req.pid);
    }
    tracing::info!(
        successor = req.pid,
        "successor ready: this instance stops accepting and drains"
    );
    Ok(req.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another user binds the abstract name first (any user can): a successor refuses to
    /// take a lock or a socket from it, naming its uid.
    #[test]
    #[allow(unsafe_code)]
    fn a_squatter_of_the_handover_name_is_refused() {
        if !crate::test_util::require_root("a_squatter_of_the_handover_name_is_refused") {
            return;
        }
        let dir = std::env::temp_dir().join(format!("np-handover-squat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = name(&dir).unwrap();
        let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only makes system calls (setuid, socket, bind, listen, write,
        // accept, pause) and exits with `_exit`; it touches no lock another thread may hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            unsafe {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    libc::_exit(2);
                }
            }
            let Ok(l) = seqpacket() else {
                unsafe { libc::_exit(3) }
            };
            if socket::bind(l.as_raw_fd(), &addr).is_err()
                || socket::listen(&l, Backlog::new(4).unwrap()).is_err()
            {
                unsafe { libc::_exit(4) };
            }
            let _ = nix::unistd::write(&ready_w, b"x");
            loop {
                let _ = socket::accept(l.as_raw_fd());
            }
        }
        drop(ready_w);
        let mut b = [0u8; 1];
        assert_eq!(
            nix::unistd::read(&ready_r, &mut b).unwrap(),
            1,
            "squatter bound"
        );
        let err = match take_over(&dir, Some(1)) {
            Ok(_) => panic!("took over from a squatter"),
            Err(e) => format!("{e:#}"),
        };
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("uid 65534"), "{err}");
    }

    #[test]
    fn a_passed_socket_must_listen_on_the_address_it_is_passed_for() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        let fd: OwnedFd = l.into();
        check_listening(&fd, at).unwrap();
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(check_listening(&fd, other).is_err(), "another address");
        let c = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream: OwnedFd = std::net::TcpStream::connect(c.local_addr().unwrap())
            .unwrap()
            .into();
        let local = socket2::SockRef::from(&stream)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap();
        assert!(check_listening(&stream, local).is_err(), "not listening");
    }
}
