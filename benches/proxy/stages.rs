//! The CPU cost of each stage of a miss, measured one stage at a time in this process on the
//! same bytes and the same filesystem as the proxy's cache: hash (SHA-256, as the cache's
//! hasher), write (the temp file, in receive-sized chunks), commit (fsync + rename). Receive
//! and send are measured around real transfers elsewhere (the client of a direct GET; the
//! proxy on a warm hit), so the split adds up to a prediction the measured miss is held to.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use sha2::{Digest as _, Sha256};

use crate::procfs;

/// Chunk size of the write stage: what hyper typically hands a body reader on loopback.
const WRITE_CHUNK: usize = 64 << 10;

/// CPU seconds and wall seconds of one stage over `len` bytes.
pub struct Stage {
    pub name: &'static str,
    pub cpu_s: f64,
    pub wall_s: f64,
}

/// CPU seconds per GiB of SHA-256 over bytes in the CPU cache (the fastest case: one 64 KiB
/// buffer again and again), as the cache's hasher computes it.
pub fn hash_per_gib() -> f64 {
    const LEN: u64 = 512 << 20;
    let buf: Vec<u8> = (0..WRITE_CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let me = std::process::id();
    let c0 = procfs::cpu_seconds(me);
    let mut h = Sha256::new();
    for _ in 0..LEN / WRITE_CHUNK as u64 {
        h.update(&buf);
    }
    std::hint::black_box(h.finalize());
    (procfs::cpu_seconds(me) - c0) / (LEN as f64 / (1u64 << 30) as f64)
}

/// Runs hash, write and commit over `len` bytes (blocking; call from a blocking thread).
pub fn measure(dir: &Path, len: u64) -> Vec<Stage> {
    let buf: Vec<u8> = (0..WRITE_CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let chunks = len / WRITE_CHUNK as u64;
    let me = std::process::id();
    let timed = |name: &'static str, f: &mut dyn FnMut()| {
        let (c0, t0) = (procfs::cpu_seconds(me), Instant::now());
        f();
        Stage {
            name,
            cpu_s: procfs::cpu_seconds(me) - c0,
            wall_s: t0.elapsed().as_secs_f64(),
        }
    };
    let mut out = Vec::new();
    out.push(timed("hash", &mut || {
        let mut h = Sha256::new();
        for _ in 0..chunks {
            h.update(&buf);
        }
        std::hint::black_box(h.finalize());
    }));
    let temp = dir.join("stage.part");
    let mut file = std::fs::File::create(&temp).expect("create stage file");
    out.push(timed("write", &mut || {
        for _ in 0..chunks {
            file.write_all(&buf).expect("write stage file");
        }
    }));
    out.push(timed("commit (fsync+rename)", &mut || {
        file.sync_all().expect("fsync stage file");
        std::fs::rename(&temp, dir.join("stage.done")).expect("rename stage file");
    }));
    let _ = std::fs::remove_file(dir.join("stage.done"));
    out
}
