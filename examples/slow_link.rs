//! A TCP link that holds every chunk for a fixed time before passing it on,
//! in both directions: a stand-in for network distance on a machine whose
//! kernel has no netem. Used by `scripts/bench.sh` to put Redis "1 ms away".
//!
//! ```sh
//! cargo run --release --example slow_link -- 127.0.0.1:7000 127.0.0.1:6379 1ms
//! ```
//! Loopback addresses only; it stops when killed.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(target), Some(delay)) = (args.get(1), args.get(2), args.get(3)) else {
        return Err(std::io::Error::other(
            "usage: slow_link LISTEN TARGET DELAY (e.g. 1ms)",
        ));
    };
    let delay = parse_delay(delay).ok_or_else(|| std::io::Error::other("DELAY like 500us, 1ms"))?;
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(&target).await {
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, delay));
                tokio::spawn(pipe(sr, cw, delay));
            }
        });
    }
}

/// Copies `from` to `to`, each chunk leaving `delay` after it arrived, in order.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((Instant::now() + delay, Bytes::copy_from_slice(&buf[..n])))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn parse_delay(s: &str) -> Option<Duration> {
    if let Some(us) = s.strip_suffix("us") {
        return us.parse().ok().map(Duration::from_micros);
    }
    s.strip_suffix("ms")?
        .parse()
        .ok()
        .map(Duration::from_millis)
}
