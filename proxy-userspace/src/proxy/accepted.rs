//! An accepted socket that joins the I/O driver only when it has to wait.
//!
//! Registering a socket with epoll and removing it again (Tokio removes it explicitly on drop)
//! are two `epoll_ctl` calls per connection: 5.6% of the proxy's CPU with a new connection per
//! request (perf, `Connection: close` over loopback), where HAProxy makes none. A client that
//! opens a connection to send a request has usually sent it by the time `accept` returns, and
//! the response usually fits the socket's send buffer, so the connection can be served with
//! plain non-blocking calls and closed without ever being registered. [`Accepted`] tries each
//! read and write on the bare socket first and registers it with the runtime of the task that
//! serves it at the first call that would block; from then on it is a Tokio `TcpStream`.
//!
//! The first idle wait is speculative ([`Transport::poll_idle`] answers ready once without
//! asking the kernel); the HTTP/1 server then reads once without waiting, and when the request
//! is not there yet it waits for real, registered and without a read buffer, like any idle
//! connection.

use std::io::{self, ErrorKind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::h1server::Transport;

/// An accepted, non-blocking TCP socket; registered with the I/O driver on first need.
#[derive(Debug)]
pub struct Accepted {
    state: State,
    /// No read attempted yet: the first idle wait is answered without registering.
    fresh: bool,
}

#[derive(Debug)]
enum State {
    Bare(std::net::TcpStream),
    Registered(TcpStream),
    /// Registration failed; the error was returned once and every later call fails.
    Failed,
}

impl Accepted {
    /// Wrap a non-blocking accepted socket (not registered with any I/O driver).
    pub fn new(stream: std::net::TcpStream) -> Self {
        Accepted {
            state: State::Bare(stream),
            fresh: true,
        }
    }

    /// Has it joined the I/O driver?
    pub fn is_registered(&self) -> bool {
        matches!(self.state, State::Registered(_))
    }

    /// The registered stream, registering it now if it is not yet (must run inside the
    /// runtime that will serve it).
    pub fn into_registered(self) -> io::Result<TcpStream> {
        match self.state {
            State::Bare(s) => TcpStream::from_std(s),
            State::Registered(s) => Ok(s),
            State::Failed => Err(failed()),
        }
    }

    /// The registered stream, registering it on the way.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        // `Failed` stays if registering fails.
        self.state = match std::mem::replace(&mut self.state, State::Failed) {
            State::Bare(s) => State::Registered(TcpStream::from_std(s)?),
            other => other,
        };
        match &mut self.state {
            State::Registered(s) => Ok(s),
            _ => Err(failed()),
        }
    }
}

fn failed() -> io::Error {
    io::Error::other("the connection could not be registered with the I/O driver")
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.fresh = false;
        if let State::Bare(s) = &this.state {
            loop {
                #[allow(unsafe_code)]
                // SAFETY: `recv` only writes bytes into the slice, it de-initializes none.
                let unfilled = unsafe { buf.unfilled_mut() };
                match SockRef::from(s).recv(unfilled) {
                    Ok(n) => {
                        #[allow(unsafe_code)]
                        // SAFETY: the kernel initialized the first `n` bytes of the unfilled part.
                        unsafe {
                            buf.assume_init(n)
                        };
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        Pin::new(this.registered()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Bare(s) = &this.state {
            loop {
                match SockRef::from(s).send_with_flags(data, libc::MSG_NOSIGNAL) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        Pin::new(this.registered()?).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket: nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Bare(s) => Poll::Ready(s.shutdown(std::net::Shutdown::Write)),
            State::Registered(s) => Pin::new(s).poll_shutdown(cx),
            State::Failed => Poll::Ready(Err(failed())),
        }
    }
}

impl Transport for Accepted {
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if std::mem::take(&mut self.fresh) && matches!(self.state, State::Bare(_)) {
            // A new connection's request is usually there already: read it without registering.
            return Poll::Ready(Ok(()));
        }
        ready!(self.registered()?.poll_read_ready(cx))?;
        Poll::Ready(Ok(()))
    }

    /// Closing the socket sends the FIN; a separate shutdown would be one more system call.
    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair: the client side (blocking std) and the accepted side, non-blocking and
    /// not registered, as the listener hands it over.
    fn pair() -> (std::net::TcpStream, Accepted) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, Accepted::new(server))
    }

    async fn idle(a: &mut Accepted) -> io::Result<()> {
        std::future::poll_fn(|cx| a.poll_idle(cx)).await
    }

    #[tokio::test]
    async fn a_waiting_request_is_served_without_registering() {
        let (mut client, mut a) = pair();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        idle(&mut a).await.unwrap();
        let mut buf = vec![0u8; 64];
        let n = a.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        a.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        a.flush().await.unwrap();
        assert!(!a.is_registered(), "nothing had to wait");
        drop(a);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(
            got, b"HTTP/1.1 200 OK\r\n\r\n",
            "dropping it closed the socket"
        );
    }

    #[tokio::test]
    async fn a_read_that_would_block_registers_and_waits() {
        let (mut client, mut a) = pair();
        // The first idle wait is speculative; the read then finds nothing and must wait.
        idle(&mut a).await.unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            client.write_all(b"late").unwrap();
            client
        });
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("woken when the bytes arrive")
            .unwrap();
        assert_eq!(&buf[..n], b"late");
        assert!(a.is_registered());
        let mut client = writer.join().unwrap();
        // Registered, idle waits are real waits.
        let waited = tokio::time::timeout(Duration::from_millis(50), idle(&mut a)).await;
        assert!(waited.is_err(), "idle until the client sends");
        client.write_all(b"x").unwrap();
        tokio::time::timeout(Duration::from_secs(5), idle(&mut a))
            .await
            .expect("ready once bytes arrive")
            .unwrap();
    }

    #[tokio::test]
    async fn a_second_idle_wait_registers() {
        let (mut client, mut a) = pair();
        client.write_all(b"one").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        idle(&mut a).await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(a.read(&mut buf).await.unwrap(), 3);
        assert!(!a.is_registered());
        // Keep-alive: waiting for the next request holds no buffer and registers.
        let waited = tokio::time::timeout(Duration::from_millis(50), idle(&mut a)).await;
        assert!(waited.is_err());
        assert!(a.is_registered());
    }

    #[tokio::test]
    async fn a_write_that_would_block_registers_and_completes() {
        let (mut client, mut a) = pair();
        // More than the socket buffers hold while the client does not read.
        let data = vec![7u8; 16 << 20];
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            got.len()
        });
        tokio::time::timeout(Duration::from_secs(10), a.write_all(&data))
            .await
            .expect("the write completes once the client reads")
            .unwrap();
        assert!(a.is_registered());
        drop(a);
        assert_eq!(reader.join().unwrap(), data.len());
    }

    #[tokio::test]
    async fn end_of_stream_and_shutdown_on_the_bare_socket() {
        let (mut client, mut a) = pair();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = [0u8; 16];
        assert_eq!(a.read(&mut buf).await.unwrap(), 0, "end of stream");
        a.shutdown().await.unwrap();
        assert!(!a.is_registered());
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "the FIN arrived");
    }
}
