//! The byte stream to Redis. Everything after opening it — the handshake,
//! the connection task, Redis tracking — is generic over
//! [`UpstreamStream`], so TLS (`rediss://`) is another way of opening, not a
//! fork of the connection code.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::UpstreamError;
use crate::config::RedisUrl;
use crate::tls::MaybeTls;

/// A connection's byte stream to Redis.
pub trait UpstreamStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamStream for S {}

/// What [`open`] yields: TCP, or TLS over it for `rediss://`.
pub type Stream = MaybeTls<TcpStream>;

/// Opens a stream to `url`'s server: TCP, with Nagle off, then TLS for a
/// `rediss://` URL. Every connection (shared, dedicated, scripts', tracking,
/// probes) opens here, so each reconnect makes its TLS handshake anew.
pub async fn open(url: &RedisUrl) -> Result<Stream, UpstreamError> {
    let tcp = open_tcp(url).await?;
    match (&url.tls, url.secure) {
        (Some(tls), _) => tls.connect(tcp).await.map_err(|e| {
            unavailable(format!(
                "TLS handshake with {}: {e} (see upstream.tls)",
                url.addr()
            ))
        }),
        // Never fall back to clear text for a rediss:// URL.
        (None, true) => Err(unavailable(format!(
            "{}: rediss:// without TLS settings (a URL not built by Config::upstream_url)",
            url.addr()
        ))),
        (None, false) => Ok(MaybeTls::Plain(tcp)),
    }
}

async fn open_tcp(url: &RedisUrl) -> Result<TcpStream, UpstreamError> {
    let addr = url.addr();
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(|e| unavailable(format!("connect to {addr}: {e}")))?;
    if self_connected(&stream) {
        return Err(unavailable(format!(
            "connect to {addr}: connected to itself (nothing listens there)"
        )));
    }
    stream
        .set_nodelay(true)
        .map_err(|e| unavailable(format!("set TCP_NODELAY on {addr}: {e}")))?;
    Ok(stream)
}

fn unavailable(msg: String) -> UpstreamError {
    UpstreamError::Unavailable(msg.into())
}

/// Whether `stream` is connected to itself: on one host, a connect to a port
/// in the ephemeral range where nothing listens can be given that very port
/// as its own (TCP's simultaneous open), and then every command would come
/// back as its own "reply". Redis down on such a port, with the pool
/// retrying, makes this a matter of time.
fn self_connected(stream: &TcpStream) -> bool {
    matches!((stream.local_addr(), stream.peer_addr()), (Ok(l), Ok(p)) if l == p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket bound to a port and connected to that same port is connected
    /// to itself (what an unlucky retry against a dead local Redis gets).
    #[tokio::test]
    async fn a_connection_to_itself_is_recognised() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = probe.local_addr().expect("its address");
        drop(probe);
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.bind(addr).expect("bind the freed port");
        let stream = socket
            .connect(addr)
            .await
            .expect("simultaneous open with itself");
        assert!(self_connected(&stream));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a listener");
        let other = TcpStream::connect(listener.local_addr().expect("its address"))
            .await
            .expect("an ordinary connection");
        assert!(!self_connected(&other));
    }
}
