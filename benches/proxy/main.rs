//! `cargo bench --bench proxy` (or `scripts/bench`): oci-proxy's blob path measured side by
//! side with references on the same machine in the same run, printed as ratios. Nothing
//! here asserts a time: goals are printed as pass/fail, and the run only fails when
//! something is functionally wrong (a status, a body length, a missing tool).
//!
//! 1. warm hit throughput of a 256 MiB blob: oci-proxy vs nginx (sendfile) serving the same
//!    file from a temp root;
//! 2. cold fetch throughput of the same blob through a fresh proxy vs the peer (Debian's
//!    docker-registry, distribution 2.8, in pull-through mode with empty storage) vs
//!    an nginx relay of the registry (no cache, no hash) vs a GET straight from the upstream
//!    (the same registry without proxy mode), alternating, with CPU per GiB of each process,
//!    the machine's idle and iowait shares, and the ceiling any verifying proxy has here
//!    ([`cold`]); then the same at the other sizes (8 MiB, 1 GiB) with warm hits vs nginx,
//!    to see cost per byte vs size;
//! 3. 50 concurrent cold clients of one blob vs one cold client, with the upstream behind a
//!    paced relay (a WAN-like link), and the number of upstream GETs (registry log);
//! 4. peak RSS (`VmHWM`) of the proxy while 50 cold clients stream a 1 GiB blob, then while
//!    50 clients read it again from the cache, and while 20 clients each fetch a different
//!    cold 64 MiB blob at once ([`distinct`]);
//! 5. the CPU split of a miss by stage ([`stages`]) next to the measured miss;
//! 6. the time to open a cache of 100 000 blobs (start to first answer) vs an empty one.
//!
//! Payloads are generated to disk and pushed with a streaming upload; clients stream and
//! discard bodies. `OCI_PROXY_BENCH_QUICK=1` shrinks everything for a smoke run;
//! `OCI_PROXY_BENCH_ONLY=cold` runs only the cold rows (2 at the three sizes; with
//! `OCI_PROXY_BENCH_MIB=256,1024` only those sizes);
//! `OCI_PROXY_BENCH_BASELINE=<oci-proxy binary>` adds that build to the cold rows, alternating
//! with this one ([`baseline`]), for a before/after within one run.

// A bench binary exports nothing: `pub` in its modules means "shared between its modules".
#![allow(unreachable_pub)]

// The integration tests' fixtures; the bench uses a few of them.
#[path = "../../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

mod baseline;
mod blobs;
mod client;
mod cold;
mod distinct;
mod nginx;
mod procfs;
mod relay;
mod stages;

use std::net::SocketAddr;
use std::time::Duration;

use blobs::BlobFile;
use support::{ProxyProcess, Registry, RegistryAuth};

const MIB: u64 = 1024 * 1024;
const REPO: &str = "bench/blob";

/// Sizes and repetitions of one run.
#[derive(Clone, Copy)]
struct Plan {
    /// Warm and cold throughput blob.
    stream_len: u64,
    /// Runs per throughput measurement (median reported).
    reps: usize,
    /// Concurrency test: blob, clients, upstream pace, runs. Followers tail the fill, so the
    /// proxy must send `clients × upstream_rate` (800 MiB/s here): that has to stay below what
    /// the machine can push through loopback with the clients on the same 2 cores (about
    /// 1.1 GiB/s, see the RSS test's "MiB/s out"), or the test measures that limit instead of
    /// coalescing.
    conc_len: u64,
    clients: usize,
    upstream_rate: u64,
    conc_reps: usize,
    /// RSS test blob; also the large size of the scaling rows.
    rss_len: u64,
    /// The small size of the scaling rows.
    small_len: u64,
    /// Runs per measurement at the scaling sizes.
    scale_reps: usize,
    /// Blobs in the cache-open measurement.
    open_blobs: u32,
    /// Distinct cold blobs fetched at once, and their size (the fills' memory budget).
    distinct: u64,
    distinct_len: u64,
    /// Pace of the WAN-like upstream for the second cold fetch row (on `conc_len`).
    wan_rate: u64,
}

impl Plan {
    fn from_env() -> Plan {
        let quick = std::env::var_os("OCI_PROXY_BENCH_QUICK").is_some_and(|v| v != "0");
        if quick {
            Plan {
                stream_len: 32 * MIB,
                reps: 3,
                conc_len: 8 * MIB,
                clients: 50,
                upstream_rate: 16 * MIB,
                conc_reps: 1,
                rss_len: 64 * MIB,
                small_len: MIB,
                scale_reps: 1,
                open_blobs: 1_000,
                distinct: 20,
                distinct_len: 4 * MIB,
                wan_rate: 64 * MIB,
            }
        } else {
            Plan {
                stream_len: 256 * MIB,
                reps: 5,
                conc_len: 32 * MIB,
                clients: 50,
                upstream_rate: 16 * MIB,
                conc_reps: 3,
                rss_len: 1024 * MIB,
                small_len: 8 * MIB,
                scale_reps: 5,
                open_blobs: 100_000,
                distinct: 20,
                distinct_len: 64 * MIB,
                wan_rate: 64 * MIB,
            }
        }
    }
}

/// One line of the result table.
struct Row {
    metric: String,
    proxy: String,
    reference: String,
    ratio: String,
    goal: String,
    pass: bool,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    for tool in [nginx::NGINX_BIN, support::registry::REGISTRY_BIN] {
        let found = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{tool}` is not installed: run scripts/bench, which installs it"
        );
    }
    let plan = Plan::from_env();
    println!(
        "oci-proxy bench: {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let work = tempfile::tempdir().expect("bench temp dir");
    let root = work.path().join("root");
    std::fs::create_dir_all(&root).expect("create nginx root");
    let stream_blob = blobs::generate(&root, "stream.bin", plan.stream_len, 1);
    let conc_blob = blobs::generate(&root, "conc.bin", plan.conc_len, 2);
    let rss_blob = blobs::generate(&root, "rss.bin", plan.rss_len, 3);
    let small_blob = blobs::generate(&root, "small.bin", plan.small_len, 4);

    let registry = Registry::start(RegistryAuth::Anonymous).await;
    for b in [&stream_blob, &conc_blob, &rss_blob, &small_blob] {
        blobs::push_streaming(&registry.url(), REPO, b).await;
    }
    let only_cold = std::env::var("OCI_PROXY_BENCH_ONLY").is_ok_and(|v| v == "cold");
    let distinct = if only_cold {
        Vec::new()
    } else {
        distinct::push(&root, &registry, plan.distinct, plan.distinct_len).await
    };
    // The pushes left over a GiB of dirty pages: flush them now, so their writeback does not
    // run during (and skew) the first measurements.
    let synced = std::process::Command::new("sync").status();
    assert!(synced.is_ok_and(|s| s.success()), "sync failed");
    let nginx = nginx::Nginx::start(&root, "stream.bin", &registry.host()).await;
    let relay = nginx.relay_url();
    println!(
        "registry {}, nginx {} (pid {:?}); blobs pushed\n",
        registry.url(),
        nginx.url(),
        nginx.pid()
    );

    let http = client::client();
    let mut rows = Vec::new();
    if only_cold {
        // `OCI_PROXY_BENCH_MIB=256` (a comma list): only the cold rows of those sizes.
        let sizes = std::env::var("OCI_PROXY_BENCH_MIB").unwrap_or_default();
        let wanted = |b: &BlobFile| {
            sizes.is_empty()
                || sizes
                    .split(',')
                    .any(|s| s.trim().parse::<u64>().ok() == Some(b.len / MIB))
        };
        for blob in [&small_blob, &stream_blob, &rss_blob] {
            if !wanted(blob) {
                continue;
            }
            rows.extend(
                cold::cold_vs_peer(plan.reps, &http, &registry, &relay, blob)
                    .await
                    .rows,
            );
        }
        print_table(&rows);
        return;
    }
    let hit = warm(plan.reps, &http, &registry, &nginx, &stream_blob).await;
    rows.push(hit.row);
    let miss = cold::cold_vs_peer(plan.reps, &http, &registry, &relay, &stream_blob).await;
    rows.extend(miss.rows);
    let upstream: SocketAddr = registry.host().parse().expect("registry address");
    let wan = relay::Relay::start(upstream, plan.wan_rate).await;
    let wan_plan = Plan {
        reps: plan.conc_reps,
        ..plan
    };
    rows.push(
        cold(
            &wan_plan,
            &http,
            &registry,
            &wan.host(),
            &conc_blob,
            &format!("upstream paced to {} MiB/s", plan.wan_rate / MIB),
        )
        .await,
    );
    drop(wan);
    rows.extend(concurrent(&plan, &http, &registry, &conc_blob).await);
    rows.extend(rss(&plan, &http, &registry, &rss_blob).await);
    rows.push(distinct::rss(&http, &registry, &distinct).await);
    for blob in [&small_blob, &rss_blob] {
        rows.push(
            warm(plan.scale_reps, &http, &registry, &nginx, blob)
                .await
                .row,
        );
        rows.extend(
            cold::cold_vs_peer(plan.scale_reps, &http, &registry, &relay, blob)
                .await
                .rows,
        );
    }
    stage_split(
        work.path(),
        stream_blob.len,
        &miss.cpu,
        hit.proxy_cpu_per_gib,
    )
    .await;
    rows.push(cache_open(&plan, work.path()).await);
    print_table(&rows);
}

/// Prints the CPU split of a miss by stage next to the measured miss.
async fn stage_split(dir: &std::path::Path, len: u64, miss: &MissCpu, send_per_gib: f64) {
    println!(
        "CPU split of a miss, {} MiB (CPU s per GiB; wall s per GiB):",
        len / MIB
    );
    let dir = dir.to_path_buf();
    let measured = tokio::task::spawn_blocking(move || stages::measure(&dir, len))
        .await
        .expect("stage task");
    let gib = len as f64 / (1024.0 * MIB as f64);
    let mut predicted = miss.receive_per_gib;
    println!(
        "  {:<24} {:.2}   (the client's CPU on a direct GET)",
        "receive", miss.receive_per_gib
    );
    for st in &measured {
        predicted += st.cpu_s / gib;
        println!(
            "  {:<24} {:.2}; wall {:.2}",
            st.name,
            st.cpu_s / gib,
            st.wall_s / gib
        );
    }
    predicted += send_per_gib;
    println!(
        "  {:<24} {send_per_gib:.2}   (oci-proxy's CPU on a warm hit)",
        "send"
    );
    println!(
        "  sum of stages {predicted:.2}; measured miss: oci-proxy {:.2}, distribution proxy {:.2}",
        miss.proxy_per_gib, miss.peer_per_gib
    );
}

/// Time from spawning a proxy to its first answer with `plan.open_blobs` committed blobs in
/// its cache, vs with an empty cache.
async fn cache_open(plan: &Plan, work: &std::path::Path) -> Row {
    let n = plan.open_blobs;
    println!("opening a cache of {n} blobs:");
    let full = work.join("open-cache");
    for i in 0..n {
        let body = i.to_le_bytes();
        let hex = blobs::sha256_hex(&body);
        let dir = full.join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&dir).expect("create blob dir");
        std::fs::write(dir.join(format!("{hex}.{}", body.len())), body).expect("write blob");
    }
    let config =
        |dir: &str| format!("listen: \"{{listen}}\"\ncache:\n  dir: \"{dir}\"\nupstreams: []\n");
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let p = ProxyProcess::start(&config("{dir}/cache")).await;
        without.push(t.elapsed().as_secs_f64());
        drop(p);
        let t = std::time::Instant::now();
        let p = ProxyProcess::start(&config(&full.display().to_string())).await;
        with.push(t.elapsed().as_secs_f64());
        let blobs_metric =
            support::helpers::metric_value(&p.metrics().await, "oci_proxy_cache_blobs");
        assert_eq!(blobs_metric as u32, n, "every blob indexed");
        drop(p);
    }
    runs_line(&format!("{n} blobs (s)"), &with, "s");
    runs_line("empty cache (s)", &without, "s");
    let (w, e) = (client::median(&with), client::median(&without));
    Row {
        metric: format!("start with {n} cached blobs (s)"),
        proxy: format!("{w:.2}"),
        reference: format!("{e:.2} (empty)"),
        ratio: format!("{:.2}", w / e),
        goal: "-".into(),
        pass: true,
    }
}

fn proxy_config(upstream_host: &str) -> String {
    format!(
        "listen: \"{{listen}}\"\ncache:\n  dir: \"{{dir}}/cache\"\nupstreams:\n  - name: \"{upstream_host}\"\n    endpoint: \"http://{upstream_host}\"\n"
    )
}

async fn start_proxy(upstream_host: &str) -> ProxyProcess {
    ProxyProcess::start(&proxy_config(upstream_host)).await
}

fn proxy_blob_url(proxy: &ProxyProcess, upstream_host: &str, blob: &BlobFile) -> String {
    format!(
        "{}/v2/{upstream_host}/{REPO}/blobs/{}",
        proxy.url(),
        blob.digest
    )
}

/// GETs of the blob the registry logged so far (its access log has one
/// `"GET /v2/<repo>/blobs/<digest> HTTP/1.1"` line per request).
fn upstream_gets(registry: &Registry, blob: &BlobFile) -> usize {
    let needle = format!("\"GET /v2/{REPO}/blobs/{} ", blob.digest);
    registry
        .logs()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

fn runs_line(name: &str, values: &[f64], unit: &str) {
    let list: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
    println!(
        "  {name:<28} runs [{}] {unit}, median {:.1}",
        list.join(", "),
        client::median(values)
    );
}

/// CPU seconds used so far by `pid` (NaN when it could not be found).
fn cpu(pid: Option<u32>) -> f64 {
    pid.map_or(f64::NAN, procfs::cpu_seconds)
}

/// Prints CPU seconds per GiB delivered for each named process.
fn cpu_line(what: &str, bytes: u64, used: &[(&str, f64)]) {
    let gib = bytes as f64 / (1024.0 * MIB as f64);
    let parts: Vec<String> = used
        .iter()
        .map(|(name, secs)| format!("{name} {:.2}", secs / gib))
        .collect();
    println!("  CPU s per GiB {what}: {}", parts.join(", "));
}

/// A warm-hit measurement: its row and oci-proxy's CPU seconds per GiB sent.
struct Warm {
    row: Row,
    proxy_cpu_per_gib: f64,
}

async fn warm(
    reps: usize,
    http: &reqwest::Client,
    registry: &Registry,
    nginx: &nginx::Nginx,
    blob: &BlobFile,
) -> Warm {
    println!("warm hit, {} MiB blob:", blob.len / MIB);
    let proxy = start_proxy(&registry.host()).await;
    let proxy_pid = Some(procfs::pid_with_arg(&proxy.dir().join("config.yaml")));
    let me = Some(std::process::id());
    let via_proxy = proxy_blob_url(&proxy, &registry.host(), blob);
    let file = blob
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("blob file name");
    let via_nginx = format!("{}/{file}", nginx.url());
    // Fill the cache, then one untimed pass each to settle connections and page cache.
    client::fetch(http, &via_proxy, blob.len).await;
    client::fetch(http, &via_proxy, blob.len).await;
    client::fetch(http, &via_nginx, blob.len).await;
    let (mut p, mut r) = (Vec::new(), Vec::new());
    let (mut p_cpu, mut r_cpu, mut c_p, mut c_r) = (0.0, 0.0, 0.0, 0.0);
    for _ in 0..reps {
        let (s0, c0) = (cpu(proxy_pid), cpu(me));
        let t = client::fetch(http, &via_proxy, blob.len).await;
        p_cpu += cpu(proxy_pid) - s0;
        c_p += cpu(me) - c0;
        p.push(client::mib_per_sec(blob.len, t));
        let (s0, c0) = (cpu(nginx.pid()), cpu(me));
        let t = client::fetch(http, &via_nginx, blob.len).await;
        r_cpu += cpu(nginx.pid()) - s0;
        c_r += cpu(me) - c0;
        r.push(client::mib_per_sec(blob.len, t));
    }
    runs_line("oci-proxy (hit)", &p, "MiB/s");
    runs_line("nginx sendfile", &r, "MiB/s");
    let total = blob.len * reps as u64;
    cpu_line(
        "via oci-proxy",
        total,
        &[("oci-proxy", p_cpu), ("client", c_p)],
    );
    cpu_line("via nginx", total, &[("nginx", r_cpu), ("client", c_r)]);
    Warm {
        row: throughput_row(
            format!("warm hit {} MiB vs nginx (MiB/s)", blob.len / MIB),
            &p,
            &r,
            0.9,
        ),
        proxy_cpu_per_gib: p_cpu / gib(total),
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * MIB as f64)
}

/// CPU seconds per GiB of a cold fetch: oci-proxy, the peer, and the client of a direct GET.
struct MissCpu {
    proxy_per_gib: f64,
    peer_per_gib: f64,
    receive_per_gib: f64,
}

/// A cold-fetch comparison: its rows and the CPU it measured.
struct Cold {
    rows: Vec<Row>,
    cpu: MissCpu,
}

/// Cold fetches of `blob` from the upstream at `upstream_host` (the registry itself or a
/// relay in front of it): each through a fresh proxy, each followed by a direct GET.
async fn cold(
    plan: &Plan,
    http: &reqwest::Client,
    registry: &Registry,
    upstream_host: &str,
    blob: &BlobFile,
    label: &str,
) -> Row {
    println!("cold fetch, {} MiB blob, {label}:", blob.len / MIB);
    let registry_pid = procfs::pid_listening_on(registry.port());
    let me = Some(std::process::id());
    let direct = format!("http://{upstream_host}/v2/{REPO}/blobs/{}", blob.digest);
    client::fetch(http, &direct, blob.len).await; // settle the registry's page cache
    let (mut p, mut r) = (Vec::new(), Vec::new());
    let (mut p_cpu, mut up_p, mut up_r, mut c_p, mut c_r) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for _ in 0..plan.reps {
        let proxy = start_proxy(upstream_host).await;
        let proxy_pid = Some(procfs::pid_with_arg(&proxy.dir().join("config.yaml")));
        let via_proxy = proxy_blob_url(&proxy, upstream_host, blob);
        let (s0, u0, c0) = (cpu(proxy_pid), cpu(registry_pid), cpu(me));
        let t = client::fetch(http, &via_proxy, blob.len).await;
        p_cpu += cpu(proxy_pid) - s0;
        up_p += cpu(registry_pid) - u0;
        c_p += cpu(me) - c0;
        p.push(client::mib_per_sec(blob.len, t));
        drop(proxy);
        let (u0, c0) = (cpu(registry_pid), cpu(me));
        let t = client::fetch(http, &direct, blob.len).await;
        up_r += cpu(registry_pid) - u0;
        c_r += cpu(me) - c0;
        r.push(client::mib_per_sec(blob.len, t));
    }
    runs_line("oci-proxy (miss)", &p, "MiB/s");
    runs_line("registry direct", &r, "MiB/s");
    let total = blob.len * plan.reps as u64;
    cpu_line(
        "via oci-proxy",
        total,
        &[("oci-proxy", p_cpu), ("registry", up_p), ("client", c_p)],
    );
    cpu_line("direct", total, &[("registry", up_r), ("client", c_r)]);
    throughput_row(
        format!("cold fetch {} MiB, {label} (MiB/s)", blob.len / MIB),
        &p,
        &r,
        0.9,
    )
}

fn throughput_row(metric: String, proxy: &[f64], reference: &[f64], goal: f64) -> Row {
    let (p, r) = (client::median(proxy), client::median(reference));
    let ratio = p / r;
    Row {
        metric,
        proxy: format!("{p:.0}"),
        reference: format!("{r:.0}"),
        ratio: format!("{ratio:.2}"),
        goal: format!(">= {goal}"),
        pass: ratio >= goal,
    }
}

async fn concurrent(
    plan: &Plan,
    http: &reqwest::Client,
    registry: &Registry,
    blob: &BlobFile,
) -> Vec<Row> {
    let rate_mib = plan.upstream_rate / MIB;
    println!(
        "{} concurrent cold clients, {} MiB blob, upstream paced to {rate_mib} MiB/s:",
        plan.clients,
        blob.len / MIB
    );
    let upstream: SocketAddr = registry.host().parse().expect("registry address");
    let relay = relay::Relay::start(upstream, plan.upstream_rate).await;
    let (mut many, mut one, mut gets) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.conc_reps {
        let proxy = start_proxy(&relay.host()).await;
        let url = proxy_blob_url(&proxy, &relay.host(), blob);
        one.push(client::fetch(http, &url, blob.len).await.as_secs_f64());
        drop(proxy);

        let proxy = start_proxy(&relay.host()).await;
        let url = proxy_blob_url(&proxy, &relay.host(), blob);
        let before = upstream_gets(registry, blob);
        let t = client::fetch_concurrent(http, &url, blob.len, plan.clients).await;
        many.push(t.as_secs_f64());
        // The registry logs a request when it completes: wait for the line.
        let wanted = before + 1;
        support::wait_until(Duration::from_secs(10), "the registry's log line", || {
            let n = upstream_gets(registry, blob);
            async move { n >= wanted }
        })
        .await;
        gets.push(upstream_gets(registry, blob) - before);
        drop(proxy);
    }
    runs_line(&format!("{} clients (s)", plan.clients), &many, "s");
    runs_line("1 client (s)", &one, "s");
    println!(
        "  upstream GETs per {}-client run: {gets:?} (relay connections in total: {})",
        plan.clients,
        relay.connections()
    );
    let (m, o) = (client::median(&many), client::median(&one));
    let ratio = m / o;
    let max_gets = gets.iter().copied().max().unwrap_or(0);
    vec![
        Row {
            metric: format!(
                "{} cold clients {} MiB @{rate_mib} MiB/s (s)",
                plan.clients,
                blob.len / MIB
            ),
            proxy: format!("{m:.2}"),
            reference: format!("{o:.2} (1 client)"),
            ratio: format!("{ratio:.2}"),
            goal: "<= 1.3".into(),
            pass: ratio <= 1.3,
        },
        Row {
            metric: format!("upstream GETs for {} cold clients", plan.clients),
            proxy: format!("{max_gets} (max of {})", gets.len()),
            reference: "-".into(),
            ratio: "-".into(),
            goal: "== 1".into(),
            pass: gets.iter().all(|g| *g == 1),
        },
    ]
}

async fn rss(
    plan: &Plan,
    http: &reqwest::Client,
    registry: &Registry,
    blob: &BlobFile,
) -> Vec<Row> {
    println!(
        "peak RSS, {} cold clients of a {} MiB blob:",
        plan.clients,
        blob.len / MIB
    );
    let proxy = start_proxy(&registry.host()).await;
    let pid = procfs::pid_with_arg(&proxy.dir().join("config.yaml"));
    let idle = procfs::status_bytes(pid, "VmHWM");
    let url = proxy_blob_url(&proxy, &registry.host(), blob);
    let t = client::fetch_concurrent(http, &url, blob.len, plan.clients).await;
    let peak = procfs::status_bytes(pid, "VmHWM");
    println!(
        "  {} x {} MiB in {:.1} s ({:.0} MiB/s out); VmHWM after start {:.1} MiB, after run {:.1} MiB",
        plan.clients,
        blob.len / MIB,
        t.as_secs_f64(),
        client::mib_per_sec(blob.len * plan.clients as u64, t),
        idle as f64 / MIB as f64,
        peak as f64 / MIB as f64
    );
    let rss_row = |kind: &str, peak: u64| {
        let peak_mib = peak as f64 / MIB as f64;
        Row {
            metric: format!(
                "peak RSS, {} clients x {} MiB {kind} (MiB)",
                plan.clients,
                blob.len / MIB
            ),
            proxy: format!("{peak_mib:.1}"),
            reference: "-".into(),
            ratio: "-".into(),
            goal: "< 100".into(),
            pass: peak_mib < 100.0,
        }
    };
    let cold = rss_row("cold", peak);
    // The same clients again, all hits now (a hit reads one chunk ahead, so it holds two);
    // writing 5 to clear_refs resets the peak to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    let t = client::fetch_concurrent(http, &url, blob.len, plan.clients).await;
    let peak = procfs::status_bytes(pid, "VmHWM");
    println!(
        "  again, all hits: {:.1} s ({:.0} MiB/s out); VmHWM {:.1} MiB",
        t.as_secs_f64(),
        client::mib_per_sec(blob.len * plan.clients as u64, t),
        peak as f64 / MIB as f64
    );
    vec![cold, rss_row("warm", peak)]
}

fn print_table(rows: &[Row]) {
    let header = [
        "metric",
        "oci-proxy",
        "reference",
        "ratio",
        "goal",
        "result",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.metric.clone(),
                r.proxy.clone(),
                r.reference.clone(),
                r.ratio.clone(),
                r.goal.clone(),
                if r.pass { "pass" } else { "FAIL" }.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: &[String]| {
        let parts: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    println!();
    println!("{}", line(&header.map(String::from)));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", rule.join("-|-"));
    for row in &cells {
        println!("{}", line(row));
    }
}
