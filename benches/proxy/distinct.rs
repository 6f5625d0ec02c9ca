//! Many distinct cold blobs at once: what anonymous clients can make a proxy hold.
//!
//! Each of `n` clients asks for a different blob the proxy has not seen, all at once, so `n`
//! fills run together (each with one reader). The row reports the proxy's peak RSS; its goal is
//! the bound the fills' shared memory budget gives (README "Limits", "Memory of cold fills"),
//! where each fill with full-size windows and write buffers would hold about 24 MiB.

use futures_util::future::join_all;

use crate::{blobs, client, procfs, proxy_blob_url, start_proxy, BlobFile, Registry, Row, MIB};

/// Peak RSS goal for the distinct-blob row, in MiB.
const GOAL_MIB: f64 = 200.0;

/// Generates and pushes `n` blobs of `len` bytes (seeds from 100) into `registry`.
pub async fn push(root: &std::path::Path, registry: &Registry, n: u64, len: u64) -> Vec<BlobFile> {
    let mut out = Vec::new();
    for i in 0..n {
        let b = blobs::generate(root, &format!("distinct-{i}.bin"), len, 100 + i);
        blobs::push_streaming(&registry.url(), crate::REPO, &b).await;
        // Only the digest is needed from here on; the registry keeps the bytes.
        let _ = std::fs::remove_file(&b.path);
        out.push(b);
    }
    out
}

/// All of `distinct` fetched at once through a fresh proxy: its peak RSS.
pub async fn rss(http: &reqwest::Client, registry: &Registry, distinct: &[BlobFile]) -> Row {
    let (n, len) = (distinct.len(), distinct.first().map_or(0, |b| b.len));
    println!(
        "peak RSS, {n} distinct cold blobs of {} MiB at once:",
        len / MIB
    );
    let proxy = start_proxy(&registry.host()).await;
    let pid = procfs::pid_with_arg(&proxy.dir().join("config.yaml"));
    let idle = procfs::status_bytes(pid, "VmHWM");
    let started = std::time::Instant::now();
    let tasks = distinct.iter().map(|b| {
        let (http, url, len) = (
            http.clone(),
            proxy_blob_url(&proxy, &registry.host(), b),
            b.len,
        );
        tokio::spawn(async move { client::fetch(&http, &url, len).await })
    });
    for r in join_all(tasks).await {
        if let Err(e) = r {
            panic!("distinct cold GET failed: {e}");
        }
    }
    let t = started.elapsed();
    let peak = procfs::status_bytes(pid, "VmHWM") as f64 / MIB as f64;
    println!(
        "  {n} x {} MiB in {:.1} s ({:.0} MiB/s out); VmHWM after start {:.1} MiB, after run {peak:.1} MiB",
        len / MIB,
        t.as_secs_f64(),
        client::mib_per_sec(len * n as u64, t),
        idle as f64 / MIB as f64,
    );
    Row {
        metric: format!(
            "peak RSS, {n} distinct cold blobs x {} MiB at once (MiB)",
            len / MIB
        ),
        proxy: format!("{peak:.1}"),
        reference: "-".into(),
        ratio: "-".into(),
        goal: format!("< {GOAL_MIB:.0}"),
        pass: peak < GOAL_MIB,
    }
}
