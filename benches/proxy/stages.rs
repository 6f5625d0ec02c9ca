//! The CPU cost of each stage of a miss, measured one stage at a time in this process on the
//! same bytes and the same filesystem as the proxy's cache: hash (SHA-256, as the cache's
//! hasher), write (as the cache's direct writer: receive-sized chunks copied into an aligned
//! 4 MiB buffer, written whole with `O_DIRECT`, or buffered where the filesystem refuses it),
//! commit (fsync + rename). Receive and send are measured around real transfers elsewhere (the
//! client of a direct GET; the proxy on a warm hit), so the split adds up to a prediction the
//! measured miss is held to.

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
    let direct = open_direct(&temp);
    let name = if direct.is_some() {
        "write (O_DIRECT)"
    } else {
        "write (buffered)"
    };
    out.push(timed(name, &mut || match &direct {
        Some(d) => write_direct(d, &buf, chunks),
        None => {
            for _ in 0..chunks {
                file.write_all(&buf).expect("write stage file");
            }
        }
    }));
    out.push(timed("commit (fsync+rename)", &mut || {
        file.sync_all().expect("fsync stage file");
        std::fs::rename(&temp, dir.join("stage.done")).expect("rename stage file");
    }));
    let _ = std::fs::remove_file(dir.join("stage.done"));
    out
}

/// Direct writes' buffer, as the cache's (`src/cache/direct.rs`).
const DIRECT_BUFFER: usize = 4 << 20;
const ALIGN: usize = 4096;

fn open_direct(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// `chunks` copies of `chunk`, gathered into an aligned buffer and written whole.
fn write_direct(file: &std::fs::File, chunk: &[u8], chunks: u64) {
    use std::os::unix::fs::FileExt;
    let mut mem = vec![0u8; DIRECT_BUFFER + ALIGN];
    let start = mem.as_ptr().align_offset(ALIGN);
    let (mut filled, mut at) = (0usize, 0u64);
    for _ in 0..chunks {
        let mut data = chunk;
        while !data.is_empty() {
            let k = (DIRECT_BUFFER - filled).min(data.len());
            mem[start + filled..start + filled + k].copy_from_slice(&data[..k]);
            filled += k;
            data = &data[k..];
            if filled == DIRECT_BUFFER {
                file.write_all_at(&mem[start..start + filled], at)
                    .expect("direct write of the stage file");
                at += filled as u64;
                filled = 0;
            }
        }
    }
    let whole = filled / ALIGN * ALIGN;
    if whole > 0 {
        file.write_all_at(&mem[start..start + whole], at)
            .expect("direct write of the stage file");
    }
}
