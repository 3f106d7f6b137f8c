//! The write half of a client connection: replies leave in command order,
//! batched into as few writes as possible.
//!
//! The session queues one [`Slot`] per reply (or per run of pipelined
//! replies). The writer appends every slot that is already answered to one
//! buffer and only writes when the next slot is still waiting, so a pipeline
//! whose replies arrive together leaves in one `write`.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use crate::upstream::{Replies, UpstreamError};

/// One reply, or a run of replies, in command order.
#[derive(Debug)]
pub enum Slot {
    /// Answered by the proxy.
    Ready(Bytes),
    /// `count` replies from upstream, arriving together.
    Upstream {
        /// Where they arrive.
        rx: oneshot::Receiver<Replies>,
        /// How many commands they answer (for error replies).
        count: u32,
    },
    /// Every frame from a relaying connection, until it ends.
    Relay(mpsc::Receiver<Bytes>),
    /// Close the connection once everything before is written.
    Close,
}

/// Above this, a reply is written directly instead of being copied into the
/// batch buffer.
const DIRECT_WRITE: usize = 32 * 1024;
/// Write once this much is buffered even if more replies are ready.
const FLUSH_AT: usize = 64 * 1024;

/// Writes slots to the client until the queue ends, a `Close` slot, or the
/// client stops reading.
pub async fn write_loop(mut sock: OwnedWriteHalf, mut slots: mpsc::Receiver<Slot>) {
    let mut out = Out {
        buf: BytesMut::with_capacity(16 * 1024),
        sock: &mut sock,
    };
    let _ = out.run(&mut slots).await;
    let _ = sock.shutdown().await;
}

struct Out<'a> {
    buf: BytesMut,
    sock: &'a mut OwnedWriteHalf,
}

impl Out<'_> {
    async fn run(&mut self, slots: &mut mpsc::Receiver<Slot>) -> std::io::Result<()> {
        loop {
            let slot = match slots.try_recv() {
                Ok(slot) => slot,
                Err(TryRecvError::Empty) => {
                    self.flush().await?;
                    match slots.recv().await {
                        Some(slot) => slot,
                        None => return Ok(()),
                    }
                }
                Err(TryRecvError::Disconnected) => return self.flush().await,
            };
            match slot {
                Slot::Ready(bytes) => self.put(bytes).await?,
                Slot::Upstream { mut rx, count } => {
                    let replies = match rx.try_recv() {
                        Ok(r) => r,
                        Err(oneshot::error::TryRecvError::Empty) => {
                            self.flush().await?;
                            rx.await.unwrap_or_else(|_| Err(lost()))
                        }
                        Err(oneshot::error::TryRecvError::Closed) => Err(lost()),
                    };
                    match replies {
                        Ok(frames) => self.put(frames).await?,
                        Err(failed) => {
                            self.put(failed.partial).await?;
                            let missing = count.saturating_sub(failed.got) as usize;
                            self.put(failed.error.to_replies(missing)).await?;
                        }
                    }
                }
                Slot::Relay(mut frames) => {
                    self.flush().await?;
                    while let Some(frame) = frames.recv().await {
                        self.put(frame).await?;
                        while let Ok(frame) = frames.try_recv() {
                            self.put(frame).await?;
                        }
                        self.flush().await?;
                    }
                }
                Slot::Close => return self.flush().await,
            }
            if self.buf.len() >= FLUSH_AT {
                self.flush().await?;
            }
        }
    }

    async fn put(&mut self, bytes: Bytes) -> std::io::Result<()> {
        if bytes.len() >= DIRECT_WRITE {
            self.flush().await?;
            return self.sock.write_all(&bytes).await;
        }
        self.buf.extend_from_slice(&bytes);
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.sock.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

fn lost() -> crate::upstream::connection::Failed {
    crate::upstream::connection::Failed {
        partial: Bytes::new(),
        got: 0,
        error: UpstreamError::ConnectionLost,
    }
}
