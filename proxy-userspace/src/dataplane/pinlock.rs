//! One eBPF instance per pin directory: an exclusive `flock` on the directory itself, held
//! for the life of the [`crate::dataplane::Kernel`]. bpffs holds only pinned objects (no
//! regular files, so no pid file); the holder's pid is read from `/proc/locks` instead.
//!
//! The lock is taken before anything in the directory is touched, so a second instance
//! refuses at once and leaves the first one's pins and programs alone, unless it takes over:
//! then the holder passes its locked descriptor along with its sockets ([`PinLock::inherit`]).
//! A `flock` belongs to the open file description, which both processes then share, and is
//! released when the last descriptor of it closes: the lock passes from one instance to the
//! next without a moment unheld. (So it is never unlocked explicitly: `LOCK_UN` would release
//! it for both.)

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The held lock; released when the last descriptor of it closes (this process's when it
/// drops or dies, however it dies, unless it was passed to a successor).
#[derive(Debug)]
pub struct PinLock {
    file: File,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another nodeproxy{} holds the pin directory {}: one eBPF instance per pin directory (stop that one first, or give this one another --bpffs)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display()
    )]
    Busy {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, when /proc/locks tells it.
        holder: Option<u32>,
    },
    /// The directory could not be created, opened or locked.
    #[error("lock the pin directory {}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl PinLock {
    /// Create `dir` if needed and lock it, without waiting.
    pub fn acquire(dir: &Path) -> Result<PinLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = File::open(dir).map_err(io)?;
        match lock_exclusive(&file) {
            Ok(()) => Ok(PinLock { file }),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(LockError::Busy {
                dir: dir.to_path_buf(),
                holder: holder_pid(&file),
            }),
            Err(e) => Err(io(e)),
        }
    }

    /// The lock a predecessor passed on (its descriptor of the locked directory): checked to
    /// be `dir` and to hold the lock (re-locking the same open file description succeeds at
    /// once; any other description would be refused).
    pub fn inherit(fd: OwnedFd, dir: &Path) -> Result<PinLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let file = File::from(fd);
        let (got, want) = (
            file.metadata().map_err(io)?,
            std::fs::metadata(dir).map_err(io)?,
        );
        if (got.dev(), got.ino()) != (want.dev(), want.ino()) {
            return Err(io(std::io::Error::other(
                "the descriptor passed as the lock is not the pin directory",
            )));
        }
        lock_exclusive(&file).map_err(io)?;
        Ok(PinLock { file })
    }

    /// The locked descriptor, to pass to a successor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn lock_exclusive(file: &File) -> std::io::Result<()> {
    // SAFETY: flock(2) on a descriptor this `File` owns; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The pid holding a `flock` on `file`, from `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`; the device is `major:minor` in hex).
fn holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    parse_holder(&locks, &want)
}

fn parse_holder(locks: &str, inode: &str) -> Option<u32> {
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Blocked waiters are listed as `1: -> FLOCK ...`: only holders count.
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == inode)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let dir = std::env::temp_dir().join(format!("np-pinlock-{}", std::process::id()));
        let first = PinLock::acquire(&dir).expect("first");
        let err = PinLock::acquire(&dir).expect_err("second");
        assert!(
            matches!(err, LockError::Busy { holder: Some(p), .. } if p == std::process::id()),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id()))
        );
        // Passed on (as a successor receives it): the same open file description holds it.
        let passed = PinLock::inherit(first.fd().try_clone_to_owned().unwrap(), &dir)
            .expect("an inherited descriptor holds the lock");
        drop(first);
        assert!(
            matches!(PinLock::acquire(&dir), Err(LockError::Busy { .. })),
            "still held through the passed descriptor"
        );
        // A descriptor of its own is no lock.
        let other = File::open(&dir).unwrap();
        assert!(PinLock::inherit(other.into(), &dir).is_err());
        drop(passed);
        let again = PinLock::acquire(&dir).expect("free again");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proc_locks_lines_give_the_holder_not_a_waiter() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:2a:77 0 EOF\n1: -> FLOCK  ADVISORY  WRITE 99 00:2a:77 0 EOF\n2: POSIX  ADVISORY  WRITE 7 00:2a:78 0 EOF\n";
        assert_eq!(parse_holder(locks, "00:2a:77"), Some(4242));
        assert_eq!(parse_holder(locks, "00:2a:78"), None);
    }
}
