//! What the server needs of a client's connection: a byte stream in both
//! directions and the addresses `CLIENT LIST` shows. Sessions are generic
//! over the stream, so a TLS stream is a constructor, not a fork.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A client connection's byte stream (TCP today; TLS plugs in here).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientStream for S {}

/// Where a client connection comes from and arrives.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The client's end (`addr=` in `CLIENT LIST`).
    pub addr: SocketAddr,
    /// nearcache's end (`laddr=`).
    pub laddr: SocketAddr,
    /// nearcache's descriptor for the connection (`fd=`; -1 where
    /// descriptors are not numbers).
    pub fd: i64,
}

impl Peer {
    /// The addresses of an accepted TCP connection from `addr`.
    pub fn of_tcp(stream: &TcpStream, addr: SocketAddr) -> Self {
        let laddr = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Self {
            addr,
            laddr,
            fd: fd(stream),
        }
    }
}

fn fd(stream: &TcpStream) -> i64 {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        i64::from(stream.as_raw_fd())
    }
    #[cfg(not(unix))]
    {
        let _ = stream;
        -1
    }
}
