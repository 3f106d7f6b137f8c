//! Opening an upstream connection: the stream ([`super::transport`]), then `HELLO <proto> [AUTH …]
//! SETNAME nearcache`, `SELECT <db>` and `INFO server` / `INFO replication`
//! (the server's [identity](Identity)) in one round trip.
//!
//! HELLO both authenticates and fixes the reply protocol of the connection,
//! which must match the clients it serves: RESP2 and RESP3 replies differ, so
//! the pools are per protocol. This is a control path, so the replies are
//! decoded with redis-protocol rather than scanned.

use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp3::decode::complete::decode;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::{self, Stream, UpstreamStream};

use super::{UpstreamError, encode_command};
use crate::config::RedisUrl;
use crate::protocol::Protocol;

/// A connected, authenticated connection, ready to be driven.
#[derive(Debug)]
pub struct Handshaken<S = Stream> {
    /// The stream.
    pub stream: S,
    /// Bytes read past the handshake replies (normally none).
    pub leftover: BytesMut,
    /// The server's `version` from the HELLO reply.
    pub server_version: String,
    /// Redis's id for this connection (`id` in the HELLO reply; 0 if absent).
    pub client_id: u64,
    /// Which server process and dataset answered; None when `INFO` is not
    /// allowed to the upstream user (or renamed away).
    pub identity: Option<Identity>,
}

/// Which Redis process, serving which replication history, a connection
/// reached: `run_id` changes with every start of the server (a restart, a
/// failover to another one, a restore), `master_replid` when its dataset's
/// history does (a replica promoted, a master made a replica of another).
/// Either changing means L1 may hold values that server never had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `run_id` of `INFO server`.
    pub run_id: String,
    /// `master_replid` of `INFO replication` ("" if absent).
    pub replid: String,
}

impl Identity {
    /// The identity in `INFO server` and `INFO replication` text; None
    /// without a `run_id`.
    fn parse(server: &str, replication: &str) -> Option<Self> {
        let value = |text: &str, name: &str| {
            text.lines().find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            })
        };
        Some(Self {
            run_id: value(server, "run_id").filter(|v| !v.is_empty())?,
            replid: value(replication, "master_replid").unwrap_or_default(),
        })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "run_id {}, replid {}", self.run_id, self.replid)
    }
}

/// Connects to `url` and prepares the connection for `db` and `proto`, as
/// the URL's user, for a control path (probe, credentials check, tracking):
/// without asking the server's identity, which only connections that serve
/// clients need.
pub async fn connect(
    url: &RedisUrl,
    db: u32,
    proto: Protocol,
    timeout: Duration,
) -> Result<Handshaken, UpstreamError> {
    connect_with(url, None, false, db, proto, timeout).await
}

/// A connection that serves clients: [`connect`], authenticating as
/// `as_user` (user, password) instead of the URL's user when given, and
/// reading the server's [`Identity`] in the same round trip.
pub async fn connect_as(
    url: &RedisUrl,
    as_user: Option<(&str, &str)>,
    db: u32,
    proto: Protocol,
    timeout: Duration,
) -> Result<Handshaken, UpstreamError> {
    connect_with(url, as_user, true, db, proto, timeout).await
}

async fn connect_with(
    url: &RedisUrl,
    as_user: Option<(&str, &str)>,
    identify: bool,
    db: u32,
    proto: Protocol,
    timeout: Duration,
) -> Result<Handshaken, UpstreamError> {
    tokio::time::timeout(timeout, connect_inner(url, as_user, identify, db, proto))
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
    as_user: Option<(&str, &str)>,
    identify: bool,
    db: u32,
    proto: Protocol,
) -> Result<Handshaken, UpstreamError> {
    let stream = transport::open(url).await?;
    handshake(stream, url, as_user, identify, db, proto).await
}

/// Prepares an open stream for `db` and `proto` (and reads the server's
/// identity if `identify`).
async fn handshake<S: UpstreamStream>(
    mut stream: S,
    url: &RedisUrl,
    as_user: Option<(&str, &str)>,
    identify: bool,
    db: u32,
    proto: Protocol,
) -> Result<Handshaken<S>, UpstreamError> {
    let addr = url.addr();
    let version = proto.version().to_string();
    let mut hello: Vec<&[u8]> = vec![b"HELLO", version.as_bytes()];
    let credentials = match (as_user, &url.password) {
        (Some((user, password)), _) => Some((user, password)),
        (None, Some(password)) => {
            Some((url.username.as_deref().unwrap_or("default"), &password[..]))
        }
        (None, None) => None,
    };
    if let Some((user, password)) = credentials {
        hello.push(b"AUTH");
        hello.push(user.as_bytes());
        hello.push(password.as_bytes());
    }
    hello.extend_from_slice(&[b"SETNAME", b"nearcache"]);
    let mut out = BytesMut::from(&encode_command(&hello)[..]);
    let db_arg = db.to_string();
    if db != 0 {
        out.extend_from_slice(&encode_command(&[&b"SELECT"[..], db_arg.as_bytes()]));
    }
    // Two commands, not `INFO server replication`: Redis before 7 takes one
    // section.
    if identify {
        out.extend_from_slice(&encode_command(&[&b"INFO"[..], b"server"]));
        out.extend_from_slice(&encode_command(&[&b"INFO"[..], b"replication"]));
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
    let identity = if identify {
        let server = read_frame(&mut stream, &mut buf, &addr).await?;
        let replication = read_frame(&mut stream, &mut buf, &addr).await?;
        match (text(&server), text(&replication)) {
            (Some(server), Some(replication)) => Identity::parse(&server, &replication),
            _ => None,
        }
    } else {
        None
    };
    Ok(Handshaken {
        stream,
        leftover: buf,
        server_version,
        client_id,
        identity,
    })
}

/// The next whole frame from `stream` (`addr` names it in errors), decoded:
/// for control paths (the handshake, Redis tracking), never for replies
/// that are forwarded.
pub(crate) async fn read_frame<S: UpstreamStream>(
    stream: &mut S,
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
        OwnedFrame::BlobString { data, .. }
        | OwnedFrame::SimpleString { data, .. }
        | OwnedFrame::VerbatimString { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        _ => None,
    }
}

fn unavailable(msg: String) -> UpstreamError {
    UpstreamError::Unavailable(msg.into())
}

/// Redis's refusal of the setup: transient while it is busy or loading.
fn rejected(msg: &str) -> UpstreamError {
    const TRANSIENT: [&str; 3] = ["BUSY", "LOADING", "MASTERDOWN"];
    if TRANSIENT.iter().any(|t| msg.starts_with(t)) {
        return UpstreamError::Busy(msg.into());
    }
    UpstreamError::Rejected(msg.into())
}

#[cfg(test)]
mod tests {
    use super::Identity;

    #[test]
    fn identity_is_read_from_info_text_and_needs_a_run_id() {
        let server = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\ntcp_port:6379\r\n";
        let replication =
            "# Replication\r\nrole:master\r\nmaster_replid:def456\r\nmaster_replid2:000\r\n";
        assert_eq!(
            Identity::parse(server, replication),
            Some(Identity {
                run_id: "abc123".into(),
                replid: "def456".into()
            })
        );
        assert_eq!(
            Identity::parse("# Server\r\nrun_id:\r\n", replication),
            None
        );
        assert_eq!(
            Identity::parse(server, "").map(|i| i.replid),
            Some(String::new())
        );
    }
}
