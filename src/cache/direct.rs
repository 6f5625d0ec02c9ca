//! Writing a fill's temp file with `O_DIRECT`: the bytes go from one reused, page-aligned
//! buffer straight to the device, without a copy into the page cache.
//!
//! Why: on a miss the buffered `write` was the most expensive stage after SHA-256 (a profile
//! of a cold 256 MiB fetch put about a quarter of the proxy's CPU in
//! `copy_folio_from_iter_atomic`, the copy into freshly allocated page-cache pages), and it
//! varies with the machine: allocating those pages means reclaiming others, and their
//! writeback (the write-behind `fdatasync`, the commit's fsync) is done in the proxy's own
//! threads. A direct write costs a user-space copy into a buffer that stays in the CPU cache
//! plus a DMA. The price: the device's speed is now on the fill's path (the writer is at most
//! [`super::fill::IN_FLIGHT`] bytes plus its two buffers behind the receive loop, and writes
//! whole buffers, so the device sees few, large writes), which any disk that keeps up
//! with a network upstream meets; and the blob is not in the page cache after its fill, so the
//! first hit reads the device.
//!
//! Durability is unchanged: a direct write reaches the device but not necessarily its
//! persistent media, nor the file's size in the journal; the commit's `fsync` before the
//! rename covers both, as before.
//!
//! Only whole [`ALIGN`] blocks go out directly; the tail of the blob (and of any pause in the
//! body that the writer drains) stays in the buffer until more bytes arrive, and the last
//! partial block is written through the ordinary descriptor. A filesystem that refuses
//! `O_DIRECT` (at open, or with `EINVAL` on a write, as tmpfs and some FUSE filesystems do)
//! gets ordinary positioned writes of the same buffer instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{mpsc, Arc};

/// Alignment of a direct write's buffer, offset and length: the page size, which covers the
/// logical block size of common devices.
pub(super) const ALIGN: usize = 4096;

/// Bytes gathered before a direct write (less for a blob whose size is known to be smaller:
/// a small blob's fill touches only what it needs).
pub(super) const BUFFER: usize = 4 << 20;

/// Told the file offset up to which every byte is written, after each write.
pub(super) type Progress = Box<dyn Fn(u64) + Send>;

/// One aligned buffer.
struct Buf {
    mem: Vec<u8>,
    /// Offset of the aligned part in `mem`.
    start: usize,
}

impl Buf {
    fn new(cap: usize) -> Buf {
        let mem = vec![0u8; cap + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN).min(ALIGN);
        Buf { mem, start }
    }

    fn bytes(&self, n: usize) -> &[u8] {
        &self.mem[self.start..self.start + n]
    }
}

/// A write for the I/O thread: the first `n` bytes of `buf` at `at`.
struct Job {
    buf: Buf,
    n: usize,
    at: u64,
}

/// Appends a fill's bytes to its temp file through two aligned buffers and an `O_DIRECT`
/// descriptor of the same file: one buffer fills (a copy that stays in the CPU cache) while an
/// I/O thread writes the other, so the device's latency overlaps the copy.
pub(super) struct DirectWriter {
    cur: Buf,
    /// The free buffer; `None` while it is being written (`writing`) or not yet needed.
    spare: Option<Buf>,
    writing: bool,
    /// Size of each buffer: [`buffer_for`] the blob, or less when many fills run at once
    /// ([`super::memory`]).
    cap: usize,
    filled: usize,
    /// File offset of `cur`'s first byte: every byte before it is written or being written.
    at: u64,
    jobs: Option<mpsc::Sender<Job>>,
    back: mpsc::Receiver<io::Result<Buf>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The buffer size a blob of `size` bytes needs: [`BUFFER`], or the blob's size in whole
/// blocks when that is less.
pub(super) fn buffer_for(size: Option<u64>) -> usize {
    size.map_or(BUFFER, |s| {
        let s = usize::try_from(s).unwrap_or(BUFFER).min(BUFFER);
        s.div_ceil(ALIGN).max(1) * ALIGN
    })
}

impl DirectWriter {
    /// Opens `path` (the temp file `file`, just created and empty) a second time for direct
    /// writes, with two buffers of `cap` bytes (a multiple of [`ALIGN`]; see [`buffer_for`]);
    /// `None` where the platform or the filesystem has no `O_DIRECT`.
    pub(super) fn open(
        path: &Path,
        file: Arc<File>,
        progress: Progress,
        cap: usize,
    ) -> Option<DirectWriter> {
        let direct = open_direct(path).ok()?;
        DirectWriter::new(Some(direct), file, progress, cap).ok()
    }

    /// Without a direct descriptor: the same buffering, ordinary positioned writes.
    #[cfg(test)]
    pub(super) fn buffered(file: Arc<File>, progress: Progress) -> DirectWriter {
        DirectWriter::new(None, file, progress, BUFFER).expect("spawn the I/O thread")
    }

    fn new(
        direct: Option<File>,
        file: Arc<File>,
        progress: Progress,
        cap: usize,
    ) -> io::Result<DirectWriter> {
        let cap = cap.div_ceil(ALIGN).max(1) * ALIGN;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, back) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("oci-proxy-write".into())
            .spawn(move || io_loop(direct, &file, &progress, &rx, &tx))?;
        Ok(DirectWriter {
            cur: Buf::new(cap),
            spare: None,
            writing: false,
            cap,
            filled: 0,
            at: 0,
            jobs: Some(jobs),
            back,
            thread: Some(thread),
        })
    }

    /// Takes `data`; hands each full buffer to the I/O thread.
    pub(super) fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let k = (self.cap - self.filled).min(data.len());
            let at = self.cur.start + self.filled;
            self.cur.mem[at..at + k].copy_from_slice(&data[..k]);
            self.filled += k;
            data = &data[k..];
            if self.filled == self.cap {
                self.submit(self.cap)?;
            }
        }
        Ok(())
    }

    /// Hands the whole blocks held to the I/O thread (what is left is less than [`ALIGN`]
    /// bytes).
    pub(super) fn flush_blocks(&mut self) -> io::Result<()> {
        let n = self.filled / ALIGN * ALIGN;
        if n > 0 {
            self.submit(n)?;
        }
        Ok(())
    }

    /// Writes everything held, the last partial block through `file`; the file's length.
    pub(super) fn finish(mut self, file: &File) -> io::Result<u64> {
        self.flush_blocks()?;
        self.wait_spare()?;
        if self.filled > 0 {
            file.write_all_at(self.cur.bytes(self.filled), self.at)?;
            self.at += self.filled as u64;
            self.filled = 0;
        }
        Ok(self.at)
    }

    /// The free buffer: once the write in flight (if any) is over; the second one is
    /// allocated when first needed.
    fn wait_spare(&mut self) -> io::Result<Buf> {
        if let Some(b) = self.spare.take() {
            return Ok(b);
        }
        if !self.writing {
            return Ok(Buf::new(self.cap));
        }
        self.writing = false;
        self.back
            .recv()
            .map_err(|_| io::Error::other("cache writer's I/O thread is gone"))?
    }

    /// Sends the first `n` bytes of the buffer (a multiple of [`ALIGN`]) to be written at
    /// `at`; the rest moves to the other buffer, which is filled next.
    fn submit(&mut self, n: usize) -> io::Result<()> {
        let mut next = self.wait_spare()?;
        let rest = self.filled - n;
        let (from, to) = (self.cur.start + n, next.start);
        next.mem[to..to + rest].copy_from_slice(&self.cur.mem[from..from + rest]);
        let full = std::mem::replace(&mut self.cur, next);
        let job = Job {
            buf: full,
            n,
            at: self.at,
        };
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            return Err(io::Error::other("cache writer's I/O thread is gone"));
        }
        self.writing = true;
        self.at += n as u64;
        self.filled = rest;
        Ok(())
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        // Lets the I/O thread finish its write and end, so the file is not written after the
        // fill is over.
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn io_loop(
    mut direct: Option<File>,
    file: &File,
    progress: &Progress,
    jobs: &mpsc::Receiver<Job>,
    back: &mpsc::Sender<io::Result<Buf>>,
) {
    while let Ok(job) = jobs.recv() {
        let buf = job.buf.bytes(job.n);
        let res = match &direct {
            Some(d) => match d.write_all_at(buf, job.at) {
                // The filesystem takes no direct writes: the same bytes, written the ordinary
                // way (over whatever part of them the direct write did put there).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    direct = None;
                    file.write_all_at(buf, job.at)
                }
                r => r,
            },
            None => file.write_all_at(buf, job.at),
        };
        let failed = res.is_err();
        if !failed {
            progress(job.at + job.n as u64);
        }
        if back.send(res.map(|()| job.buf)).is_err() || failed {
            return;
        }
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    /// An empty temp file, as a fill creates it: its directory, path and descriptor.
    fn temp_file() -> (tempfile::TempDir, std::path::PathBuf, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.part");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (dir, path, Arc::new(file))
    }

    #[test]
    fn odd_sized_pieces_land_byte_exact_directly_and_buffered() {
        let body = data(BUFFER * 2 + 3 * ALIGN + 1234);
        let pieces = [100_000, 1, ALIGN, 3 << 20, 777];
        for direct in [true, false] {
            let (_dir, path, file) = temp_file();
            let done = Arc::new(AtomicU64::new(0));
            let d2 = done.clone();
            let progress: Progress = Box::new(move |n| d2.store(n, Ordering::SeqCst));
            let mut w = if direct {
                // Where the test's filesystem has no O_DIRECT this is the buffered path too.
                DirectWriter::open(&path, file.clone(), progress, BUFFER)
                    .unwrap_or_else(|| DirectWriter::buffered(file.clone(), Box::new(|_| {})))
            } else {
                DirectWriter::buffered(file.clone(), progress)
            };
            let (mut rest, mut i, mut given) = (&body[..], 0, 0u64);
            while !rest.is_empty() {
                let k = pieces[i % pieces.len()].min(rest.len());
                w.append(&rest[..k]).unwrap();
                rest = &rest[k..];
                given += k as u64;
                w.flush_blocks().unwrap();
                let on_disk = done.load(Ordering::SeqCst);
                assert_eq!(
                    on_disk % ALIGN as u64,
                    0,
                    "only whole blocks before the end"
                );
                assert!(on_disk <= given);
                i += 1;
            }
            assert_eq!(w.finish(&file).unwrap(), body.len() as u64);
            assert!(std::fs::read(&path).unwrap() == body, "direct: {direct}");
        }
    }

    /// A blob of announced size gets buffers of its size in whole blocks (not 4 MiB), and its
    /// bytes land exact, whether or not they fill the buffer, in one piece or many.
    #[test]
    fn a_small_blob_gets_small_buffers_and_lands_byte_exact() {
        for len in [1, ALIGN - 1, ALIGN, 3 * ALIGN + 17, 300_000] {
            let body = data(len);
            let (_dir, path, file) = temp_file();
            let cap = buffer_for(Some(len as u64));
            let mut w = DirectWriter::open(&path, file.clone(), Box::new(|_| {}), cap)
                .unwrap_or_else(|| {
                    DirectWriter::new(None, file.clone(), Box::new(|_| {}), cap).unwrap()
                });
            assert_eq!(w.cap, len.div_ceil(ALIGN) * ALIGN, "buffer of {len} bytes");
            for piece in body.chunks(5000) {
                w.append(piece).unwrap();
            }
            assert_eq!(w.finish(&file).unwrap(), len as u64);
            assert!(std::fs::read(&path).unwrap() == body, "{len} bytes");
        }
    }
}
