//! [`BlobReader`]: streams a blob to a client out of a committed file (hit) or out of a fill
//! as its bytes arrive (miss and coalesced).
//!
//! A fill's reader takes the upstream's chunks from memory while they are there (the fill's
//! [`super::fill::Recent`]: no copy, no disk), and `pread`s the temp file only when it lags
//! behind them or joined late, switching back to memory once it catches up.
//! File reads copy out of the kernel into a fresh buffer. When the page cache has the bytes
//! (the usual hit) the read runs on the runtime thread (`RWF_NOWAIT`, no hand-off), in
//! [`LARGE_CHUNK`]s while a process-wide budget lasts, else in [`CHUNK`]s; when it does not,
//! the read goes to the blocking pool, one [`CHUNK`] ahead, so the disk read of the next
//! chunk overlaps the socket write of this one (two chunks per client at most). A stream never
//! ends cleanly with unverified bytes: when the end of the requested bytes is known, the chunk
//! holding the last byte is held back until the fill is verified ([`Phase::Verified`]: size
//! and digest matched, the commit may still be under way) or, for a hit not yet verified since
//! the restart, until the whole file hashed right. On failure the stream ends with an `Err`.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::{mpsc, watch};

use super::fill::{Direct, Fill, LeadGuard, Phase};
use super::{Inner, Outcome};
use crate::protocol::grammar::{Digest, Hasher};

/// Largest read from a cache file. Small on purpose: a client that stops reading holds at most
/// two of them (the one hyper is writing and the one read ahead), so 300 stalled readers of a
/// cached blob cost about 40 MiB, not 300 (README "Limits").
pub(super) const CHUNK: usize = 64 << 10;

/// A read from the page cache may be this large while [`LARGE_CHUNKS`] lasts: a hit of a
/// large blob then costs a quarter of the system calls and wake-ups per byte (measured on a
/// 256 MiB hit: about half the CPU per byte, and throughput on par with nginx's `sendfile`).
pub(super) const LARGE_CHUNK: usize = 256 << 10;

/// Large chunks alive at once in the whole process (16 MiB): each is counted until the
/// client's connection has written it, so stalled readers can never hold more than this in
/// large chunks; beyond it, reads are [`CHUNK`]s.
pub(super) const LARGE_CHUNKS: usize = 64;

/// A blob for one client.
pub struct BlobReader {
    pub(super) inner: Arc<Inner>,
    pub(super) digest: Digest,
    pub(super) outcome: Outcome,
    pub(super) size: Option<u64>,
    pub(super) source: Source,
}

pub(super) enum Source {
    /// A committed file; `unverified` holds the index generation when the content has not
    /// been hashed since the restart.
    File {
        file: Arc<File>,
        unverified: Option<u64>,
    },
    Fill {
        fill: Arc<Fill>,
        /// The first client of a fill gets the rest of an uncached body here.
        direct: Option<mpsc::Receiver<Direct>>,
        /// The first client tells the fill how far it read (the fill waits for it).
        lead: Option<LeadGuard>,
    },
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn unsatisfiable() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "range not satisfiable")
}

impl BlobReader {
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Total size when known (always for hits; from Content-Length for fills).
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The bytes `[start, end]` (inclusive) or the whole blob.
    pub fn into_stream(self, range: Option<(u64, u64)>) -> BoxStream<'static, io::Result<Bytes>> {
        if let Some((s, e)) = range {
            if s > e || self.size.is_some_and(|size| e >= size) {
                return stream::once(async { Err(unsatisfiable()) }).boxed();
            }
        }
        let start = range.map_or(0, |r| r.0);
        let end = range.map(|r| r.1 + 1).or(self.size);
        if let Source::Fill { lead: Some(l), .. } = &self.source {
            l.at(start);
        }
        let state = Reader {
            inner: self.inner,
            digest: self.digest,
            outcome: self.outcome,
            pos: start,
            end,
            range_given: range.is_some(),
            source: self.source,
            phase: None,
            hasher: None,
            checked: false,
            ahead: None,
            dpos: None,
            direct_done: false,
        };
        stream::unfold(Some(state), |st| async move {
            let mut st = st?;
            match st.next_chunk().await {
                Ok(Some(b)) => {
                    st.inner.metrics.served(st.outcome, b.len() as u64);
                    Some((Ok(b), Some(st)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
        .boxed()
    }
}

struct Reader {
    inner: Arc<Inner>,
    digest: Digest,
    outcome: Outcome,
    pos: u64,
    /// One past the last byte wanted, when known.
    end: Option<u64>,
    range_given: bool,
    source: Source,
    phase: Option<watch::Receiver<Phase>>,
    /// Inline verification of an unverified hit read whole.
    hasher: Option<Hasher>,
    /// Whether the unverified-hit check was set up.
    checked: bool,
    /// The next chunk of a committed file, being read while the current one is sent.
    ahead: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
    /// Offset of the next chunk on the direct channel (uncached fills).
    dpos: Option<u64>,
    /// The direct channel said the body verified.
    direct_done: bool,
}

async fn read_at(
    file: Arc<File>,
    pos: u64,
    len: usize,
    hasher: Option<Hasher>,
) -> io::Result<(Bytes, Option<Hasher>)> {
    tokio::task::spawn_blocking(move || {
        let b = super::store::read_exact_at(&file, pos, len)?;
        let mut hasher = hasher;
        if let Some(h) = hasher.as_mut() {
            h.update(&b);
        }
        Ok((b, hasher))
    })
    .await
    .map_err(io::Error::other)?
}

/// Hashes a whole file (for a ranged read of a blob not verified since the restart).
async fn file_matches(file: Arc<File>, size: u64, digest: Digest) -> io::Result<bool> {
    tokio::task::spawn_blocking(move || {
        let mut h = Hasher::new(digest.algorithm());
        let mut pos = 0;
        while pos < size {
            let n = CHUNK.min((size - pos) as usize);
            h.update(&super::store::read_exact_at(&file, pos, n)?);
            pos += n as u64;
        }
        Ok(h.matches(&digest))
    })
    .await
    .map_err(io::Error::other)?
}

impl Reader {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match &self.source {
            Source::File { file, unverified } => {
                let (file, unverified) = (file.clone(), *unverified);
                self.next_from_file(file, unverified).await
            }
            Source::Fill { fill, .. } => {
                let fill = fill.clone();
                self.next_from_fill(fill).await
            }
        }
    }

    async fn next_from_file(
        &mut self,
        file: Arc<File>,
        unverified: Option<u64>,
    ) -> io::Result<Option<Bytes>> {
        let end = self.end.unwrap_or(0);
        if let (Some(gen), false) = (unverified, self.checked) {
            self.checked = true;
            let size = file.metadata()?.len();
            if self.pos == 0 && end == size {
                self.hasher = Some(Hasher::new(self.digest.algorithm()));
            } else if file_matches(file.clone(), size, self.digest.clone()).await? {
                self.inner.mark_verified(&self.digest, gen);
            } else {
                self.inner
                    .drop_corrupt(&self.digest, gen, "content does not match its digest");
                return Err(err("cached blob is corrupt"));
            }
        }
        if self.pos >= end {
            return Ok(None);
        }
        let rest = (end - self.pos) as usize;
        let mut len = CHUNK.min(rest);
        // From the page cache on this thread when it has the bytes (a large chunk while the
        // budget lasts); otherwise on the blocking pool (and then the next chunk is read there
        // too, ahead).
        let mut blocked = false;
        let b = match self.ahead.take() {
            Some(task) => task.await.map_err(io::Error::other)??,
            None => {
                let cached = match self.hasher {
                    None => {
                        let large = if rest > CHUNK {
                            self.inner.large_reads.clone().try_acquire_owned().ok()
                        } else {
                            None
                        };
                        let want = large.as_ref().map_or(len, |_| LARGE_CHUNK.min(rest));
                        let got = super::store::read_cached_at(&file, self.pos, want, large)?;
                        if got.is_some() {
                            len = want;
                        }
                        got
                    }
                    Some(_) => None,
                };
                match cached {
                    Some(b) => b,
                    None => {
                        blocked = true;
                        let (b, hasher) =
                            read_at(file.clone(), self.pos, len, self.hasher.take()).await?;
                        self.hasher = hasher;
                        b
                    }
                }
            }
        };
        self.pos += len as u64;
        // Read the next chunk while this one goes out (not while hashing inline, which must
        // see the chunks in order): the pread overlaps the socket write, as sendfile would.
        if blocked && self.pos < end && self.hasher.is_none() {
            let (pos, next) = (self.pos, CHUNK.min((end - self.pos) as usize));
            self.ahead = Some(tokio::task::spawn_blocking(move || {
                super::store::read_exact_at(&file, pos, next)
            }));
        }
        if self.pos == end {
            if let (Some(h), Some(gen)) = (self.hasher.take(), unverified) {
                if h.matches(&self.digest) {
                    self.inner.mark_verified(&self.digest, gen);
                } else {
                    self.inner
                        .drop_corrupt(&self.digest, gen, "content does not match its digest");
                    return Err(err("cached blob is corrupt"));
                }
            }
        }
        Ok(Some(b))
    }

    async fn next_from_fill(&mut self, fill: Arc<Fill>) -> io::Result<Option<Bytes>> {
        let rx = self.phase.get_or_insert_with(|| fill.phase.subscribe());
        loop {
            let phase = rx.borrow_and_update().clone();
            let (avail, size, cached) = match &phase {
                Phase::Fetching => (0, None, true),
                Phase::Streaming { size, written } => (*written, *size, true),
                Phase::Uncached { size, written } => (*written, *size, false),
                Phase::Verified { size } | Phase::Complete { size } => (*size, Some(*size), true),
                Phase::Failed { message, .. } => {
                    return Err(err(format!("cache fill failed: {message}")));
                }
            };
            // Verified is enough to end cleanly: the commit does not change the bytes.
            let complete = matches!(phase, Phase::Verified { .. } | Phase::Complete { .. });
            let end = if self.range_given { self.end } else { size };
            if let (Some(e), Some(s)) = (end, size) {
                if e > s {
                    return Err(unsatisfiable());
                }
            }
            if end.is_some_and(|e| self.pos >= e) || (complete && self.pos >= avail) {
                if complete {
                    return Ok(None);
                }
                self.wait_verified().await?;
                return Ok(None);
            }
            if self.pos < avail {
                let want = end.map_or(avail, |e| e.min(avail));
                let b = match fill.bytes_at(self.pos, want) {
                    Ok(b) => b,
                    Err(upto) => {
                        let len = CHUNK.min((upto - self.pos) as usize);
                        let Some(file) = fill.file.get().cloned() else {
                            return Err(err("cache fill has no file"));
                        };
                        let b = match super::store::read_cached_at(&file, self.pos, len, None)? {
                            Some(b) => b,
                            None => read_at(file, self.pos, len, None).await?.0,
                        };
                        self.inner.metrics.read_back(b.len() as u64);
                        b
                    }
                };
                self.pos += b.len() as u64;
                if let Source::Fill { lead: Some(l), .. } = &self.source {
                    l.at(self.pos);
                }
                if end == Some(self.pos) && !complete {
                    // Hold the last bytes back until the fill is verified.
                    self.wait_verified().await?;
                }
                return Ok(Some(b));
            }
            if !cached {
                return self.next_direct(avail, end).await;
            }
            if rx.changed().await.is_err() {
                return Err(err("cache fill writer is gone"));
            }
        }
    }

    /// Waits until the fill's bytes are verified; an error if the fill fails.
    async fn wait_verified(&mut self) -> io::Result<()> {
        let Some(rx) = self.phase.as_mut() else {
            return Err(err("no fill to wait for"));
        };
        let p = rx
            .wait_for(|p| p.is_terminal() || matches!(p, Phase::Verified { .. }))
            .await
            .map_err(|_| err("cache fill writer is gone"))?
            .clone();
        match p {
            Phase::Verified { .. } | Phase::Complete { .. } => Ok(()),
            Phase::Uncached { .. } => self.drain_direct().await,
            Phase::Failed { message, .. } => Err(err(format!("cache fill failed: {message}"))),
            _ => Err(err("cache fill in an unexpected state")),
        }
    }

    /// The first client of an uncached fill: the body from offset `from` on comes by channel.
    async fn next_direct(&mut self, from: u64, end: Option<u64>) -> io::Result<Option<Bytes>> {
        let Source::Fill {
            direct: Some(direct),
            ..
        } = &mut self.source
        else {
            return Err(err("cache write failed for this blob; retry"));
        };
        let mut dpos = self.dpos.unwrap_or(from);
        loop {
            let msg = direct.recv().await;
            match msg {
                Some(Direct::Data(b)) => {
                    let (c_start, c_end) = (dpos, dpos + b.len() as u64);
                    dpos = c_end;
                    self.dpos = Some(dpos);
                    let lo = self.pos.max(c_start);
                    let hi = end.map_or(c_end, |e| e.min(c_end));
                    if lo >= hi {
                        continue; // before the wanted range
                    }
                    let piece = b.slice((lo - c_start) as usize..(hi - c_start) as usize);
                    self.pos = hi;
                    if end == Some(self.pos) {
                        // Hold back the last bytes until the body is verified.
                        self.drain_direct().await?;
                    }
                    return Ok(Some(piece));
                }
                Some(Direct::End) if end.is_none_or(|e| self.pos >= e) => {
                    self.direct_done = true;
                    return Ok(None);
                }
                Some(Direct::End) => return Err(unsatisfiable()),
                Some(Direct::Failed(m)) => return Err(err(format!("upstream body failed: {m}"))),
                None => return Err(err("uncached fill ended early")),
            }
        }
    }

    /// Reads the rest of an uncached body, to learn whether it verified.
    async fn drain_direct(&mut self) -> io::Result<()> {
        if self.direct_done {
            return Ok(());
        }
        let Source::Fill {
            direct: Some(direct),
            ..
        } = &mut self.source
        else {
            return Err(err("cache write failed for this blob; retry"));
        };
        loop {
            match direct.recv().await {
                Some(Direct::Data(_)) => {}
                Some(Direct::End) => {
                    self.direct_done = true;
                    return Ok(());
                }
                Some(Direct::Failed(m)) => return Err(err(format!("upstream body failed: {m}"))),
                None => return Err(err("uncached fill ended early")),
            }
        }
    }
}
