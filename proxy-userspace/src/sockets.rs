//! The process's listening sockets, by address: the ones a predecessor passed on at takeover
//! (taken by whoever binds that address next, instead of binding a new socket), and a copy of
//! each one this process listens on (what it passes on in turn). A socket passed on is the
//! same kernel socket in both processes, with one accept queue: a connection waiting in it
//! when the old process stops accepting is accepted by the new one, none is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Sockets {
    inherited: Mutex<HashMap<SocketAddr, OwnedFd>>,
    listening: Mutex<HashMap<SocketAddr, OwnedFd>>,
}

impl Sockets {
    /// Sockets a predecessor passed on, by the address each is bound to.
    pub fn inherit(&self, sockets: impl IntoIterator<Item = (SocketAddr, OwnedFd)>) {
        self.inherited.lock().expect("sockets").extend(sockets);
    }

    /// The inherited socket bound to `addr`, if any (each is taken once).
    pub fn take_inherited(&self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self.inherited.lock().expect("sockets").remove(&addr)?;
        Some(std::net::TcpListener::from(fd))
    }

    /// Close the inherited sockets nothing took (addresses the new configuration does not
    /// have); returns their addresses.
    pub fn release_inherited(&self) -> Vec<SocketAddr> {
        self.inherited
            .lock()
            .expect("sockets")
            .drain()
            .map(|(a, _)| a)
            .collect()
    }

    /// This process now listens on `socket` (a copy of its descriptor is kept to pass on).
    pub fn listening(&self, socket: &impl AsFd) {
        let fd = socket.as_fd();
        let Ok(addr) = socket2::SockRef::from(&fd).local_addr() else {
            return;
        };
        let (Some(addr), Ok(dup)) = (addr.as_socket(), fd.try_clone_to_owned()) else {
            return;
        };
        self.listening.lock().expect("sockets").insert(addr, dup);
    }

    /// This process no longer listens on `addr`.
    pub fn closed(&self, addr: SocketAddr) {
        self.listening.lock().expect("sockets").remove(&addr);
    }

    /// Copies of every listening socket, to pass on.
    pub fn to_pass_on(&self) -> Vec<(SocketAddr, OwnedFd)> {
        self.listening
            .lock()
            .expect("sockets")
            .iter()
            .filter_map(|(a, fd)| Some((*a, fd.try_clone().ok()?)))
            .collect()
    }

    /// Forget every copy (the listeners stop: the successor holds the sockets now).
    pub fn clear(&self) {
        self.listening.lock().expect("sockets").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_socket_is_the_same_socket_with_the_same_queue() {
        let old = Sockets::default();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        old.listening(&l);
        // A client connects before the handover; the old process never accepts it.
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let new = Sockets::default();
        new.inherit(old.to_pass_on());
        drop(l);
        old.clear();
        let taken = new.take_inherited(addr).expect("inherited by address");
        assert!(new.take_inherited(addr).is_none(), "taken once");
        let (mut accepted, _) = taken.accept().expect("the waiting connection");
        use std::io::{Read, Write};
        client.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        accepted.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        assert!(new.release_inherited().is_empty());
    }
}
