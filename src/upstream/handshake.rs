//! Opening an upstream connection: TCP connect, then `HELLO <proto> [AUTH …]
//! SETNAME nearcache` and `SELECT <db>` in one round trip.
//!
//! HELLO both authenticates and fixes the reply protocol of the connection,
//! which must match the clients it serves: RESP2 and RESP3 replies differ, so
//! the pools are per protocol. This is a control path, so the replies are
//! decoded with redis-protocol rather than scanned.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp3::decode::complete::decode;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{UpstreamError, encode_command};
use crate::config::RedisUrl;
use crate::protocol::Protocol;

/// A connected, authenticated connection, ready to be driven.
#[derive(Debug)]
pub struct Handshaken {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read past the handshake replies (normally none).
    pub leftover: BytesMut,
    /// The server's `version` from the HELLO reply.
    pub server_version: String,
    /// Redis's id for this connection (`id` in the HELLO reply; 0 if absent).
    pub client_id: u64,
}

/// Connects to `url` and prepares the connection for `db` and `proto`.
pub async fn connect(
    url: &RedisUrl,
    db: u32,
    proto: Protocol,
    timeout: Duration,
) -> Result<Handshaken, UpstreamError> {
    tokio::time::timeout(timeout, connect_inner(url, db, proto))
        .await
        .map_err(|_| {
            unavailable(format!(
                "connect to {} timed out after {timeout:?}",
                url.addr()
            ))
        })?
}

async fn connect_inner(
    url: &RedisUrl,
    db: u32,
    proto: Protocol,
) -> Result<Handshaken, UpstreamError> {
    let addr = url.addr();
    let mut stream = TcpStream::connect(&addr)
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

    let version = proto.version().to_string();
    let mut hello: Vec<&[u8]> = vec![b"HELLO", version.as_bytes()];
    if let Some(password) = &url.password {
        hello.push(b"AUTH");
        hello.push(url.username.as_deref().unwrap_or("default").as_bytes());
        hello.push(password.as_bytes());
    }
    hello.extend_from_slice(&[b"SETNAME", b"nearcache"]);
    let mut out = BytesMut::from(&encode_command(&hello)[..]);
    let db_arg = db.to_string();
    if db != 0 {
        out.extend_from_slice(&encode_command(&[&b"SELECT"[..], db_arg.as_bytes()]));
    }
    stream
        .write_all(&out)
        .await
        .map_err(|e| unavailable(format!("write to {addr}: {e}")))?;

    let mut buf = BytesMut::with_capacity(1024);
    let hello_reply = read_frame(&mut stream, &mut buf, &addr).await?;
    let server_version = match &hello_reply {
        OwnedFrame::SimpleError { data, .. } => return Err(rejected(data)),
        OwnedFrame::BlobError { data, .. } => return Err(rejected(&String::from_utf8_lossy(data))),
        other => field(other, "version").unwrap_or_default(),
    };
    let client_id = match lookup(&hello_reply, "id") {
        Some(OwnedFrame::Number { data, .. }) => u64::try_from(*data).unwrap_or(0),
        _ => 0,
    };
    if db != 0 {
        if let OwnedFrame::SimpleError { data, .. } =
            read_frame(&mut stream, &mut buf, &addr).await?
        {
            return Err(rejected(&data));
        }
    }
    Ok(Handshaken {
        stream,
        leftover: buf,
        server_version,
        client_id,
    })
}

/// Whether `stream` is connected to itself: on one host, a connect to a port
/// in the ephemeral range where nothing listens can be given that very port
/// as its own (TCP's simultaneous open), and then every command would come
/// back as its own "reply". Redis down on such a port, with the pool
/// retrying, makes this a matter of time.
fn self_connected(stream: &TcpStream) -> bool {
    matches!((stream.local_addr(), stream.peer_addr()), (Ok(l), Ok(p)) if l == p)
}

async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    addr: &str,
) -> Result<OwnedFrame, UpstreamError> {
    loop {
        match decode(buf) {
            Ok(Some((frame, used))) => {
                let _ = buf.split_to(used);
                return Ok(frame);
            }
            Ok(None) => {}
            Err(_) => return Err(UpstreamError::InvalidReply),
        }
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| unavailable(format!("read from {addr}: {e}")))?;
        if n == 0 {
            return Err(unavailable(format!(
                "{addr} closed the connection during setup"
            )));
        }
    }
}

/// The string value for `key` in a HELLO reply.
fn field(frame: &OwnedFrame, key: &str) -> Option<String> {
    lookup(frame, key).and_then(text)
}

/// The value for `key` in a HELLO reply (a map in RESP3, a flat key/value
/// array in RESP2).
fn lookup<'a>(frame: &'a OwnedFrame, key: &str) -> Option<&'a OwnedFrame> {
    match frame {
        OwnedFrame::Map { data, .. } => data
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(key))
            .map(|(_, v)| v),
        OwnedFrame::Array { data, .. } => data
            .chunks(2)
            .find(|kv| text(&kv[0]).as_deref() == Some(key))
            .and_then(|kv| kv.get(1)),
        _ => None,
    }
}

fn text(f: &OwnedFrame) -> Option<String> {
    match f {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        _ => None,
    }
}

fn unavailable(msg: String) -> UpstreamError {
    UpstreamError::Unavailable(msg.into())
}

fn rejected(msg: &str) -> UpstreamError {
    UpstreamError::Rejected(msg.into())
}

/// Bytes of a `PING` command, for health checks.
pub fn ping() -> Bytes {
    Bytes::from_static(b"*1\r\n$4\r\nPING\r\n")
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
