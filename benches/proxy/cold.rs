//! Cold fetches side by side, and what each one costs the whole machine.
//!
//! Four paths fetch the same blob from the same loopback registry, alternating within each
//! run so that all see the same load: a fresh oci-proxy (empty cache), a fresh distribution
//! proxy (the peer, empty storage), nginx relaying the registry (`proxy_pass`, no cache, no
//! hash: what any user-space proxy has to do at least), and a direct GET. For each path the
//! bench reads the CPU of every process on it (registry, the process in the middle, the
//! client) and the machine's idle time, so a result says which resource ran out.
//!
//! On a machine where the cold fetch is CPU-bound (every core busy), throughput is
//! `cores / (CPU s per GiB of all processes)`. A verifying proxy cannot spend less than a
//! relay plus SHA-256 of every byte, which gives a ceiling for any such proxy here, printed
//! next to the goals.

use crate::{
    baseline, client, cpu, proxy_blob_url, proxy_config, runs_line, stages, start_proxy,
    throughput_row, BlobFile, Cold, MissCpu, Registry, MIB, REPO,
};

/// The runs of one path: throughput, machine idle and iowait, and the CPU seconds per GiB of
/// each process on it (registry, the process in the middle, the client), one entry a run.
#[derive(Default)]
struct PathRuns {
    mib_s: Vec<f64>,
    idle: Vec<f64>,
    iowait: Vec<f64>,
    registry: Vec<f64>,
    middle: Vec<f64>,
    client: Vec<f64>,
    /// Bytes the middle process read from files (a proxy's readers that fell behind its
    /// fill read the temp file), per byte delivered.
    file_reads: Vec<f64>,
}

impl PathRuns {
    /// One GET of `url` (the whole blob), with the CPU of the registry, of `middle` (the
    /// process between, if any) and of this process (the client).
    async fn fetch(
        &mut self,
        http: &reqwest::Client,
        url: &str,
        blob: &BlobFile,
        registry: Option<u32>,
        middle: Option<u32>,
    ) {
        let me = Some(std::process::id());
        let mid = |pid: Option<u32>| pid.map_or(0.0, crate::procfs::cpu_seconds);
        let reads = |pid: Option<u32>| pid.map_or(0, crate::procfs::read_chars);
        let (r0, m0, c0, f0) = (cpu(registry), mid(middle), cpu(me), reads(middle));
        let t0 = crate::procfs::machine_ticks();
        let t = client::fetch(http, url, blob.len).await;
        let (idle, iowait) = crate::procfs::idle_iowait(t0, crate::procfs::machine_ticks());
        let gib = blob.len as f64 / (1024.0 * MIB as f64);
        self.registry.push((cpu(registry) - r0) / gib);
        self.middle.push((mid(middle) - m0) / gib);
        self.client.push((cpu(me) - c0) / gib);
        let file = reads(middle).saturating_sub(f0) as f64 / blob.len as f64;
        self.file_reads.push(file);
        self.mib_s.push(client::mib_per_sec(blob.len, t));
        self.idle.push(idle * 100.0);
        self.iowait.push(iowait * 100.0);
    }

    fn median(&self) -> f64 {
        client::median(&self.mib_s)
    }

    /// CPU seconds per GiB delivered over all runs (means: `/proc` counts in 10 ms ticks,
    /// too coarse for one run of a small blob): registry, middle, client.
    fn per_gib(&self) -> (f64, f64, f64) {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        (mean(&self.registry), mean(&self.middle), mean(&self.client))
    }

    fn print(&self, name: &str) {
        let (r, m, c) = self.per_gib();
        let sum = r + m + c;
        // Cores kept busy at the median rate: the whole machine's share of the transfer.
        let busy = sum * self.median() / 1024.0;
        println!(
            "  {name:<26} {:>6.0} MiB/s | CPU s/GiB registry {r:.2}, middle {m:.2}, client {c:.2}, \
             sum {sum:.2} ({busy:.2} cores busy) | idle {:.0}%, iowait {:.0}% | read back {:.2}x",
            self.median(),
            client::median(&self.idle),
            client::median(&self.iowait),
            client::median(&self.file_reads),
        );
    }
}

/// Cold fetches of `blob` from the loopback registry, alternating in each run: a fresh
/// oci-proxy, a fresh distribution proxy, an nginx relay, a direct GET (and another build of
/// oci-proxy, with `OCI_PROXY_BENCH_BASELINE`).
pub async fn cold_vs_peer(
    reps: usize,
    http: &reqwest::Client,
    registry: &Registry,
    relay_url: &str,
    blob: &BlobFile,
) -> Cold {
    let mb = blob.len / MIB;
    println!("cold fetch, {mb} MiB blob, loopback upstream (medians of {reps} runs):");
    let registry_pid = crate::procfs::pid_listening_on(registry.port());
    let relay_pid = url::Url::parse(relay_url)
        .ok()
        .and_then(|u| u.port())
        .and_then(crate::procfs::pid_listening_on);
    let direct = format!("{}/v2/{REPO}/blobs/{}", registry.url(), blob.digest);
    let relayed = format!("{relay_url}/v2/{REPO}/blobs/{}", blob.digest);
    client::fetch(http, &direct, blob.len).await; // settle the registry's page cache
    let (mut proxy, mut peer) = (PathRuns::default(), PathRuns::default());
    let (mut relay, mut straight) = (PathRuns::default(), PathRuns::default());
    let mut base = PathRuns::default();
    let base_bin = baseline::binary();
    for _ in 0..reps {
        if let Some(bin) = &base_bin {
            let b = baseline::Baseline::start(bin, &proxy_config(&registry.host())).await;
            let url = format!(
                "{}/v2/{}/{REPO}/blobs/{}",
                b.url(),
                registry.host(),
                blob.digest
            );
            base.fetch(http, &url, blob, registry_pid, Some(b.pid()))
                .await;
        }
        let p = start_proxy(&registry.host()).await;
        let pid = crate::procfs::pid_with_arg(&p.dir().join("config.yaml"));
        let url = proxy_blob_url(&p, &registry.host(), blob);
        proxy.fetch(http, &url, blob, registry_pid, Some(pid)).await;
        drop(p);

        let q = Registry::start_pull_through(&registry.url()).await;
        let pid = crate::procfs::pid_listening_on(q.port());
        let url = format!("{}/v2/{REPO}/blobs/{}", q.url(), blob.digest);
        peer.fetch(http, &url, blob, registry_pid, pid).await;
        drop(q);

        relay
            .fetch(http, &relayed, blob, registry_pid, relay_pid)
            .await;
        straight
            .fetch(http, &direct, blob, registry_pid, None)
            .await;
    }
    runs_line("oci-proxy (miss)", &proxy.mib_s, "MiB/s");
    runs_line("distribution proxy (miss)", &peer.mib_s, "MiB/s");
    runs_line("nginx relay (no cache)", &relay.mib_s, "MiB/s");
    runs_line("registry direct", &straight.mib_s, "MiB/s");
    proxy.print("oci-proxy (miss)");
    if base_bin.is_some() {
        base.print("baseline oci-proxy (miss)");
    }
    peer.print("distribution proxy (miss)");
    relay.print("nginx relay");
    straight.print("direct");
    ceiling(&proxy, &peer, &relay, &straight).await;

    let (_, proxy_cpu, _) = proxy.per_gib();
    let (_, peer_cpu, _) = peer.per_gib();
    let (_, _, receive) = straight.per_gib();
    let mut rows = vec![
        throughput_row(
            format!("cold {mb} MiB vs distribution proxy (MiB/s)"),
            &proxy.mib_s,
            &peer.mib_s,
            1.2,
        ),
        throughput_row(
            format!("cold {mb} MiB vs direct (MiB/s)"),
            &proxy.mib_s,
            &straight.mib_s,
            0.6,
        ),
    ];
    if base_bin.is_some() {
        rows.push(throughput_row(
            format!("cold {mb} MiB vs baseline build (MiB/s)"),
            &proxy.mib_s,
            &base.mib_s,
            1.0,
        ));
    }
    Cold {
        rows,
        cpu: MissCpu {
            proxy_per_gib: proxy_cpu,
            peer_per_gib: peer_cpu,
            receive_per_gib: receive,
        },
    }
}

/// The fastest cold fetch any verifying proxy could reach on this machine: its own CPU at
/// least the relay's plus SHA-256 of every byte (hashed from cache, the fastest case), the
/// registry's and the client's as measured on the proxy path, every core busy.
async fn ceiling(proxy: &PathRuns, peer: &PathRuns, relay: &PathRuns, direct: &PathRuns) {
    let hash = tokio::task::spawn_blocking(stages::hash_per_gib)
        .await
        .unwrap_or(f64::NAN);
    let (_, relay_mid, _) = relay.per_gib();
    let (registry, mid, client) = proxy.per_gib();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let floor = relay_mid + hash;
    let best = cores / (registry + floor + client) * 1024.0;
    println!(
        "  ceiling for a verifying proxy here: relay {relay_mid:.2} + SHA-256 {hash:.2} = \
         {floor:.2} CPU s/GiB (oci-proxy spends {mid:.2}); with registry {registry:.2} and client \
         {client:.2} on {cores} cores: at most {best:.0} MiB/s = {:.2}x the distribution proxy, \
         {:.2}x direct",
        best / peer.median(),
        best / direct.median(),
    );
}
