//! Whether Redis still holds a connection's oldest request, or the
//! connection is dead.
//!
//! A request can legitimately wait longer than `command_timeout`: behind a
//! script running past `busy-reply-threshold`, a write held by `CLIENT PAUSE
//! WRITE`, a slow `KEYS`. Declaring the connection dead then would fail every
//! client on it with a reply Redis never sends. So before a connection times
//! out, a fresh connection asks Redis about it (`CLIENT LIST ID <its id>`):
//! a Redis that answers — with the connection's line, or `-BUSY` because a
//! script runs — is still working on it, and the wait goes on; one that does
//! not answer within the connect timeout is hung (or gone), and so is the
//! connection. (`CLIENT PAUSE ALL` holds the question too: a connection
//! waiting longer than `command_timeout` under it is declared dead.)

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::AsyncWriteExt;

use super::{UpstreamError, encode_command, handshake};
use crate::config::RedisUrl;
use crate::protocol::Protocol;

/// How to ask Redis about a connection.
#[derive(Debug)]
pub struct Probe {
    url: Arc<ArcSwap<RedisUrl>>,
    timeout: Duration,
}

impl Probe {
    /// Asks `url`'s server, allowing `timeout` for connecting and answering.
    pub fn new(url: Arc<ArcSwap<RedisUrl>>, timeout: Duration) -> Self {
        Self { url, timeout }
    }

    /// True when Redis answers and still has connection `redis_id` (or is
    /// too busy running a script to say, which it is for ours).
    pub async fn holds(&self, redis_id: u64) -> bool {
        match tokio::time::timeout(self.timeout, self.ask(redis_id)).await {
            Ok(Ok(held)) => held,
            Ok(Err(UpstreamError::Busy(_))) => true,
            Ok(Err(_)) | Err(_) => false,
        }
    }

    async fn ask(&self, redis_id: u64) -> Result<bool, UpstreamError> {
        let url = self.url.load_full();
        let h = handshake::connect(&url, 0, Protocol::Resp2, self.timeout).await?;
        let (mut stream, mut buf) = (h.stream, h.leftover);
        let id = redis_id.to_string();
        stream
            .write_all(&encode_command(&[
                &b"CLIENT"[..],
                b"LIST",
                b"ID",
                id.as_bytes(),
            ]))
            .await
            .map_err(|_| UpstreamError::ConnectionLost)?;
        let needle = format!("id={id} ");
        match handshake::read_frame(&mut stream, &mut buf, &url.addr()).await? {
            OwnedFrame::SimpleError { data, .. } => Ok(data.starts_with("BUSY")),
            OwnedFrame::BlobString { data, .. } | OwnedFrame::VerbatimString { data, .. } => {
                Ok(String::from_utf8_lossy(&data).starts_with(&needle))
            }
            _ => Ok(false),
        }
    }
}
