//! Hostile clients and upstreams against the proxy's resource limits (`config.limits`). Each
//! test plays the attacker against the real binary and asserts what the client gets and what
//! the proxy holds afterwards: free upstream slots, closed connections, its own memory
//! (`VmRSS` / `VmHWM` of the proxy process).
//!
//! Limits are tiny here (2 blob slots, 1 s timeouts, 3 s rate windows) so the tests are fast;
//! the defaults are in README "Limits".

use crate::support;

use std::time::Duration;

use reqwest::StatusCode;
use support::flood::{Blob, HostileRegistry, TagPages, MANIFEST_TYPE};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const UPSTREAM: &str = "hostile.test";

fn config(upstream: &str, limits: &str) -> String {
    format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\nlimits:\n{limits}\
         upstreams:\n  - name: {UPSTREAM}\n    endpoint: {upstream}\ndefault_upstream: {UPSTREAM}\n"
    )
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("field in /proc status")
        * 1024
}

/// Resets the process's `VmHWM` to its current RSS (Linux `clear_refs` 5).
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

const MIB: u64 = 1 << 20;

/// How far the proxy's RSS rose above `baseline` (bytes): its `VmHWM` when it could be reset
/// before the load (`resettable`), never less than the highest `VmRSS` sampled during it.
fn growth(pid: u32, baseline: u64, resettable: bool, sampled: u64, what: &str) -> u64 {
    let peak = if resettable {
        proc_kib(pid, "VmHWM").max(sampled)
    } else {
        sampled
    };
    eprintln!(
        "baseline {} MiB, peak {} MiB over {what}",
        baseline / MIB,
        peak / MIB
    );
    peak.saturating_sub(baseline)
}

async fn limit_hits(proxy: &ProxyProcess, limit: &str) -> f64 {
    metric_sum(
        &proxy.metrics().await,
        "oci_proxy_limit_hits_total",
        &[("limit", limit)],
    )
}

async fn fill_failures(proxy: &ProxyProcess, reason: &str) -> f64 {
    metric_sum(
        &proxy.metrics().await,
        "oci_proxy_cache_fills_failed_total",
        &[("reason", reason)],
    )
}

/// Reads until the server closes the connection (EOF or reset); the bytes read. Panics if it
/// stays open for `deadline`.
async fn wait_closed(stream: &mut TcpStream, deadline: Duration) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {deadline:?} ({total} bytes read)"),
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n as u64,
        }
    }
}

fn digest_of(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

/// Four slow blobs that their clients abandon hold both blob slots only until the fill
/// budget (minimum rate) gives up; meanwhile a manifest is served from the other pool, and a
/// third blob gets a 503 with `Retry-After` and `TOOMANYREQUESTS` instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_slow_fills_free_their_slots_and_never_block_manifests() {
    let up = HostileRegistry::start().await;
    // 10 bytes per 100 ms: 100 B/s, far below the 1 KiB/s minimum.
    let slow = Blob::Trickle {
        size: 1 << 20,
        chunk: 10,
        every: Duration::from_millis(100),
    };
    for n in 1..=3 {
        up.set_blob(&digest_of(n), slow);
    }
    let proxy = ProxyProcess::start(&config(
        &up.url(),
        "  max_concurrent_upstream_fetches: 2\n  max_concurrent_upstream_requests: 4\n  \
         upstream_slot_wait: 500ms\n  fill_min_rate: 1KiB\n  fill_rate_window: 3s\n",
    ))
    .await;
    let client = http_client();
    let blob = |n: u8| format!("{}/v2/app/blobs/{}", proxy.url(), digest_of(n));

    // Two pulls start their fills and disconnect.
    for n in 1..=2 {
        let resp = client.get(blob(n)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        drop(resp);
    }
    wait_until(
        Duration::from_secs(10),
        "both slow fills upstream",
        || async { up.open_bodies() == 2 },
    )
    .await;

    // Both blob slots are taken: a manifest and its HEAD do not wait behind them.
    let manifest = format!("{}/v2/app/manifests/latest", proxy.url());
    let resp = client
        .get(&manifest)
        .header("Accept", MANIFEST_TYPE)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "manifest while blob slots are full"
    );
    let resp = client
        .head(&manifest)
        .header("Accept", MANIFEST_TYPE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // A third blob gets no slot within upstream_slot_wait.
    let resp = client.get(blob(3)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "{retry}");
    let body = resp.text().await.unwrap();
    assert!(body.contains("\"TOOMANYREQUESTS\""), "{body}");
    assert!(limit_hits(&proxy, "upstream_slot_wait").await >= 1.0);

    // The detached fills are abandoned by the rate check, and their upstream bodies closed.
    wait_until(Duration::from_secs(20), "slow fills abandoned", || async {
        fill_failures(&proxy, "too_slow").await == 2.0
    })
    .await;
    wait_until(
        Duration::from_secs(10),
        "upstream bodies closed",
        || async { up.open_bodies() == 0 },
    )
    .await;

    // The slots are free again: the third blob starts.
    let resp = client.get(blob(3)).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "a slot after the fills ended"
    );
    drop(resp);
    assert_eq!(
        up.requests("blob"),
        3,
        "the refused request never went upstream"
    );
}

/// An upstream fast enough for any minimum rate but endless in practice: the fill is
/// abandoned at `fill_deadline`, its reader gets a cut body, and its upstream connection and
/// slot are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_past_its_deadline_is_abandoned() {
    let up = HostileRegistry::start().await;
    // 10 KiB every 50 ms (200 KiB/s): 100 MiB would take minutes.
    up.set_blob(
        &digest_of(1),
        Blob::Trickle {
            size: 100 << 20,
            chunk: 10 << 10,
            every: Duration::from_millis(50),
        },
    );
    let proxy = ProxyProcess::start(&config(
        &up.url(),
        "  max_concurrent_upstream_fetches: 1
  fill_deadline: 2s
  fill_min_rate: 1KiB
  \
         fill_rate_window: 1s
",
    ))
    .await;
    let resp = http_client()
        .get(format!("{}/v2/app/blobs/{}", proxy.url(), digest_of(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let read = resp.bytes().await;
    assert!(
        read.is_err(),
        "the reader of an abandoned fill gets a cut body"
    );
    wait_until(Duration::from_secs(10), "deadline counted", || async {
        fill_failures(&proxy, "deadline").await == 1.0
    })
    .await;
    assert_eq!(fill_failures(&proxy, "too_slow").await, 0.0);
    wait_until(Duration::from_secs(10), "upstream body closed", || async {
        up.open_bodies() == 0
    })
    .await;
}

/// `max_blob_size`: an announced size beyond it is refused before the body is read; a body
/// without a length is cut when it passes it, and nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_beyond_max_blob_size_are_refused_or_cut() {
    let up = HostileRegistry::start().await;
    up.set_blob(&digest_of(1), Blob::Announced { size: 10 << 30 });
    up.set_blob(&digest_of(2), Blob::Unsized { size: 3 << 20 });
    let proxy = ProxyProcess::start(&config(&up.url(), "  max_blob_size: 1MiB\n")).await;
    let client = http_client();

    let resp = client
        .get(format!("{}/v2/app/blobs/{}", proxy.url(), digest_of(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("\"DENIED\"") && body.contains("max_blob_size"),
        "{body}"
    );
    assert_eq!(limit_hits(&proxy, "max_blob_size").await, 1.0);
    wait_until(Duration::from_secs(10), "the huge body dropped", || async {
        up.open_bodies() == 0
    })
    .await;

    let sent = client
        .get(format!("{}/v2/app/blobs/{}", proxy.url(), digest_of(2)))
        .send()
        .await;
    // Refused outright, cut before the head was out, or cut mid-body: never a clean 3 MiB.
    if let Ok(resp) = sent {
        if resp.status() == StatusCode::OK {
            let read = resp.bytes().await;
            assert!(read.is_err(), "a cut body must end with an error");
        }
    }
    wait_until(Duration::from_secs(10), "too_large counted", || async {
        fill_failures(&proxy, "too_large").await == 1.0
    })
    .await;
}

/// 300 clients with tiny receive buffers ask for a cached 24 MiB blob and never read: the
/// proxy's memory grows by less than 100 MiB, and each connection is closed after
/// `write_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_cost_bounded_memory_and_are_disconnected() {
    const READERS: usize = 300;
    const SIZE: usize = 24 << 20;
    let up = FaultyRegistry::start().await;
    let digest = up.add_blob("app", &random_bytes(SIZE, 7));
    let proxy = ProxyProcess::start(&config(
        &up.url(),
        "  write_timeout: 4s\n  max_connections: 1000\n",
    ))
    .await;
    let path = format!("/v2/app/blobs/{digest}");
    // Cache it.
    let body = http_client()
        .get(format!("{}{path}", proxy.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), SIZE);
    drop(body);

    let pid = proxy.pid();
    let baseline = proc_kib(pid, "VmRSS");
    let peak_resettable = reset_peak(pid);
    let addr = proxy.host().parse().unwrap();
    let mut sockets = Vec::new();
    for _ in 0..READERS {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n").as_bytes())
            .await
            .unwrap();
        sockets.push(s);
    }
    let mut sampled_peak = baseline;
    wait_until(
        Duration::from_secs(60),
        "every stalled reader timed out",
        || {
            sampled_peak = sampled_peak.max(proc_kib(pid, "VmRSS"));
            async { limit_hits(&proxy, "write_timeout").await >= READERS as f64 }
        },
    )
    .await;
    let what = format!("{READERS} stalled readers");
    let grown = growth(pid, baseline, peak_resettable, sampled_peak, &what);
    assert!(
        grown < 100 * MIB,
        "{READERS} stalled readers grew the proxy by {} MiB",
        grown / MIB
    );
    // Every connection is closed, none got the whole blob.
    for s in &mut sockets {
        let read = wait_closed(s, Duration::from_secs(20)).await;
        assert!(read < SIZE as u64, "{read}");
    }
    // And the proxy still serves.
    let resp = http_client()
        .get(format!("{}{path}", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().len(), SIZE);
}

/// 24 clients each ask for a different cold 12 MiB blob and never read (tiny receive
/// buffers): every fill waits for its client at most a second, then goes on alone, within
/// its share of the memory all fills may hold. The proxy grows by far less than the 24 full
/// windows and write buffers (about 380 MiB) that each fill used to keep, and every blob
/// is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_cold_blobs_at_once_share_bounded_memory() {
    const BLOBS: u8 = 24;
    const SIZE: usize = 12 << 20;
    let up = FaultyRegistry::start().await;
    let digests: Vec<String> = (0..BLOBS)
        .map(|i| up.add_blob("app", &random_bytes(SIZE, 100 + u64::from(i))))
        .collect();
    let proxy = ProxyProcess::start(&config(&up.url(), "  max_connections: 1000\n")).await;
    let pid = proxy.pid();
    let baseline = proc_kib(pid, "VmRSS");
    let peak_resettable = reset_peak(pid);
    let addr = proxy.host().parse().unwrap();
    let mut sockets = Vec::new();
    for d in &digests {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let get = format!("GET /v2/app/blobs/{d} HTTP/1.1\r\nHost: proxy\r\n\r\n");
        s.write_all(get.as_bytes()).await.unwrap();
        sockets.push(s);
    }
    let mut sampled_peak = baseline;
    wait_until(
        Duration::from_secs(120),
        "every fill committed without its client",
        || {
            sampled_peak = sampled_peak.max(proc_kib(pid, "VmRSS"));
            let proxy = &proxy;
            async move {
                let m = proxy.metrics().await;
                metric_sum(&m, "oci_proxy_cache_fills_committed_total", &[]) >= f64::from(BLOBS)
            }
        },
    )
    .await;
    let what = format!("{BLOBS} distinct cold blobs");
    let grown = growth(pid, baseline, peak_resettable, sampled_peak, &what);
    assert!(
        grown < 160 * MIB,
        "{BLOBS} fills at once grew the proxy by {} MiB",
        grown / MIB
    );
    drop(sockets);
    // Each blob is now a hit, byte for byte.
    let resp = http_client()
        .get(format!("{}/v2/app/blobs/{}", proxy.url(), digests[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().len(), SIZE);
    let m = proxy.metrics().await;
    let hits = metric_sum(&m, "oci_proxy_cache_requests_total", &[("outcome", "hit")]);
    assert_eq!(hits, 1.0);
    wait_until(Duration::from_secs(10), "no fill running", || async {
        let m = proxy.metrics().await;
        metric_sum(&m, "oci_proxy_cache_fills_running", &[]) == 0.0
    })
    .await;
}

/// Sends `GET /v2/` on a raw connection and reads the response head.
async fn raw_get(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// With `max_connections: 2`, a third connection is closed unanswered; when one of the two
/// goes away, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed() {
    let up = HostileRegistry::start().await;
    let proxy = ProxyProcess::start(&config(&up.url(), "  max_connections: 2\n")).await;
    let connect = || async { TcpStream::connect(proxy.host()).await.unwrap() };
    let mut a = connect().await;
    assert!(raw_get(&mut a).await.starts_with("HTTP/1.1 200"));
    // The start-up check's connection may still be closing: retry until the second fits.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let b = loop {
        let mut s = connect().await;
        if raw_get(&mut s).await.starts_with("HTTP/1.1 200") {
            break s;
        }
        assert!(
            std::time::Instant::now() < end,
            "no second connection served"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let mut c = connect().await;
    let head = raw_get(&mut c).await;
    assert!(head.is_empty(), "a third connection was answered: {head}");
    assert_eq!(wait_closed(&mut c, Duration::from_secs(5)).await, 0);

    drop(a);
    wait_until(
        Duration::from_secs(10),
        "a slot after a connection closed",
        || async {
            let mut s = connect().await;
            raw_get(&mut s).await.starts_with("HTTP/1.1 200")
        },
    )
    .await;
    drop(b);
    wait_until(Duration::from_secs(10), "the refusal counted", || async {
        match http_client()
            .get(format!("{}/metrics", proxy.url()))
            .send()
            .await
        {
            Ok(r) => r.text().await.is_ok_and(|t| {
                metric_sum(
                    &t,
                    "oci_proxy_limit_hits_total",
                    &[("limit", "max_connections")],
                ) >= 1.0
            }),
            Err(_) => false,
        }
    })
    .await;
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one frame: (type, flags, stream, payload); None when the connection ended.
async fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload))
}

/// `GET /v2/` as an HPACK block without Huffman or indexing: `:method GET`, `:scheme http`,
/// `:path /v2/`, `:authority x`.
const GET_V2: &[u8] = &[
    0x82, 0x86, 0x04, 0x04, b'/', b'v', b'2', b'/', 0x01, 0x01, b'x',
];

/// h2c with prior knowledge: a connection that sends only the preface, or a HEADERS frame
/// that never ends, is closed after `header_read_timeout`; an idle one after `idle_timeout`;
/// the server announces the stream cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stalled_heads_and_idle_connections_are_closed() {
    let up = HostileRegistry::start().await;
    let proxy = ProxyProcess::start(&config(
        &up.url(),
        "  header_read_timeout: 1s\n  idle_timeout: 2s\n  write_timeout: 2s\n  \
         max_concurrent_streams: 7\n",
    ))
    .await;

    // Preface only.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    let (kind, _, _, payload) = read_frame(&mut s).await.expect("server SETTINGS");
    assert_eq!(kind, 4, "SETTINGS first");
    let max_streams = payload
        .chunks(6)
        .find(|e| e[..2] == [0, 3])
        .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
    assert_eq!(max_streams, Some(7), "SETTINGS_MAX_CONCURRENT_STREAMS");
    wait_closed(&mut s, Duration::from_secs(10)).await;

    // A HEADERS frame without END_HEADERS, and no CONTINUATION.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(4, 0, 0, &[])).await.unwrap();
    s.write_all(&frame(1, 0x1, 1, &GET_V2[..3])).await.unwrap(); // END_STREAM only
    wait_closed(&mut s, Duration::from_secs(10)).await;
    assert!(limit_hits(&proxy, "header_read_timeout").await >= 2.0);

    // A complete request, answered; then the connection idles and is closed.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(4, 0, 0, &[])).await.unwrap();
    loop {
        let (kind, flags, _, _) = read_frame(&mut s).await.expect("server SETTINGS");
        if kind == 4 && flags & 1 == 0 {
            break;
        }
    }
    s.write_all(&frame(4, 1, 0, &[])).await.unwrap(); // ACK
    s.write_all(&frame(1, 0x5, 1, GET_V2)).await.unwrap(); // END_STREAM | END_HEADERS
    let status = loop {
        let (kind, _, stream, payload) = read_frame(&mut s).await.expect("response HEADERS");
        if kind == 1 && stream == 1 {
            break payload.first().copied();
        }
    };
    assert_eq!(status, Some(0x88), ":status 200 (static index 8)");
    wait_closed(&mut s, Duration::from_secs(10)).await;
    assert!(limit_hits(&proxy, "idle_timeout").await >= 1.0);

    // A stream the client grants no window (SETTINGS_INITIAL_WINDOW_SIZE 0) while the
    // connection stays open: closed after write_timeout.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(4, 0, 0, &[0, 4, 0, 0, 0, 0]))
        .await
        .unwrap();
    loop {
        let (kind, flags, _, _) = read_frame(&mut s).await.expect("server SETTINGS");
        if kind == 4 && flags & 1 == 0 {
            break;
        }
    }
    s.write_all(&frame(4, 1, 0, &[])).await.unwrap();
    s.write_all(&frame(1, 0x5, 1, GET_V2)).await.unwrap();
    let before = limit_hits(&proxy, "write_timeout").await;
    let mut data = 0;
    while let Some((kind, _, stream, payload)) = read_frame(&mut s).await {
        if kind == 0 && stream == 1 {
            data += payload.len();
        }
    }
    assert_eq!(data, 0, "no DATA without window");
    assert!(limit_hits(&proxy, "write_timeout").await > before);

    // HTTP/1.1 keep-alive idles out the same way.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    assert!(raw_get(&mut s).await.starts_with("HTTP/1.1 200"));
    wait_closed(&mut s, Duration::from_secs(10)).await;
    assert!(limit_hits(&proxy, "idle_timeout").await >= 2.0);
}

/// An upstream whose tag list pages are 2 MB each and never end: one client request makes at
/// most 10 upstream requests, the proxy stays under 200 MiB, and the cut list says so with a
/// `Link` that keeps `ns=`. A single page beyond `max_tag_list_size` is an error about the
/// tag list, not about a manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_tag_lists_are_cut_with_bounded_requests_and_memory() {
    let up = HostileRegistry::start().await;
    up.set_tags(
        "flood",
        TagPages {
            page_bytes: 2_000_000,
            pages: usize::MAX,
        },
    );
    up.set_tags(
        "onepage",
        TagPages {
            page_bytes: 20_000_000,
            pages: 1,
        },
    );
    let proxy = ProxyProcess::start(&config(&up.url(), "  max_connections: 100\n")).await;
    let pid = proxy.pid();
    reset_peak(pid);
    let client = http_client();

    for query in ["?n=1&ns=hostile.test", "?ns=hostile.test"] {
        let before = up.requests("tags");
        let resp = client
            .get(format!("{}/v2/flood/tags/list{query}", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{query}");
        let link = resp
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("a Link to the rest");
        assert!(
            link.contains("ns=hostile.test") && link.contains("rel=\"next\""),
            "{link}"
        );
        let list: serde_json::Value = resp.json().await.unwrap();
        let tags = list["tags"].as_array().unwrap();
        assert!(!tags.is_empty());
        let made = up.requests("tags") - before;
        assert!(
            (1..=10).contains(&made),
            "{query}: {made} upstream requests"
        );
    }
    // Only the request without n was cut by a limit.
    assert_eq!(limit_hits(&proxy, "tag_list").await, 1.0);
    let peak = proc_kib(pid, "VmHWM");
    eprintln!("tag flood: peak RSS {} MiB", peak / MIB);
    assert!(peak < 200 * MIB, "tag flood peak RSS {} MiB", peak / MIB);

    let resp = client
        .get(format!("{}/v2/onepage/tags/list", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("max_tag_list_size") && !body.contains("manifest"),
        "{body}"
    );
}
