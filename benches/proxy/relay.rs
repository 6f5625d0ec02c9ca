//! A TCP pass-through in front of the upstream registry that paces the upstream → proxy
//! direction to a fixed rate, standing in for a WAN link (a registry on the internet is far
//! slower than one on loopback). It counts connections; the registry log counts GETs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Relay buffer: the pacing granularity.
const BUF: usize = 64 * 1024;

/// A running relay; the accept loop (and every connection it spawned) stops on drop.
pub struct Relay {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on 127.0.0.1:<free port> and forwards to `upstream`, sending at most
    /// `bytes_per_sec` per connection towards the client.
    pub async fn start(upstream: SocketAddr, bytes_per_sec: u64) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                conns.spawn(relay_one(down, upstream, bytes_per_sec));
            }
        });
        Relay {
            addr,
            connections,
            accept,
        }
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection task.
        self.accept.abort();
    }
}

async fn relay_one(down: TcpStream, upstream: SocketAddr, rate: u64) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
        let _ = up_w.shutdown().await;
    };
    let responses = async {
        let mut buf = vec![0u8; BUF];
        // Pacing: byte n may leave no earlier than `start + n / rate`; the clock restarts
        // after an idle gap so a keep-alive connection does not bank credit.
        let mut start = Instant::now();
        let mut sent: u64 = 0;
        loop {
            let n = match up_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = Instant::now();
            let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            if now > due + Duration::from_millis(50) {
                start = now;
                sent = 0;
            }
            sent += n as u64;
            let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
            if down_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = down_w.shutdown().await;
    };
    tokio::join!(requests, responses);
}
