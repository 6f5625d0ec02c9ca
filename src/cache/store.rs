//! The content-addressed file store: where blobs live on disk, temp files, commit, rebuild.
//!
//! Layout under `cache.dir` (file names are built from validated digest hex only):
//! - `blobs/<alg>/<hex[..2]>/<hex>.<size>`: committed blobs. The size recorded in the name at
//!   commit lets the rebuild drop truncated files with one `stat`, without reading them.
//! - `tmp/<hex>.<n>.part`: fills in progress; all removed on open. Same filesystem as `blobs/`,
//!   so commit is an atomic `rename`.
//!
//! Everything here is blocking file I/O: callers run it on the blocking pool.

use std::fs::{self, File};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;

use crate::protocol::grammar::{Algorithm, Digest};

/// A committed blob found on disk by [`Store::rebuild`].
#[derive(Debug)]
pub(super) struct Found {
    pub digest: Digest,
    pub size: u64,
}

/// What [`Store::rebuild`] saw.
#[derive(Debug, Default)]
pub(super) struct Rebuilt {
    pub blobs: Vec<Found>,
    /// Truncated, misnamed or duplicate files removed.
    pub dropped: Vec<(Option<Digest>, String)>,
    pub temp_removed: usize,
}

#[derive(Debug, Clone)]
pub(super) struct Store {
    root: PathBuf,
}

const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

impl Store {
    pub(super) fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn shard_dir(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
    }

    /// Where a committed blob of `size` bytes lives.
    pub(super) fn blob_path(&self, digest: &Digest, size: u64) -> PathBuf {
        self.shard_dir(digest)
            .join(format!("{}.{size}", digest.hex()))
    }

    /// A fresh temp path for a fill of `digest`; `n` makes it unique within the process, and
    /// the tmp dir is emptied on open, so it is unique on disk too.
    pub(super) fn temp_path(&self, digest: &Digest, n: u64) -> PathBuf {
        self.tmp_dir().join(format!("{}.{n}.part", digest.hex()))
    }

    /// Creates the directories the store needs.
    pub(super) fn create_dirs(&self) -> io::Result<()> {
        fs::create_dir_all(self.tmp_dir())?;
        for alg in ALGORITHMS {
            fs::create_dir_all(self.root.join("blobs").join(alg.as_str()))?;
        }
        Ok(())
    }

    /// Creates a temp file for writing (and reading back by followers).
    pub(super) fn create_temp(&self, path: &Path) -> io::Result<File> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }

    /// Makes a fully written and verified temp file durable and visible under its final name.
    pub(super) fn commit(
        &self,
        file: &File,
        temp: &Path,
        digest: &Digest,
        size: u64,
    ) -> io::Result<()> {
        file.sync_data()?;
        let dir = self.shard_dir(digest);
        fs::create_dir_all(&dir)?;
        fs::rename(temp, self.blob_path(digest, size))?;
        // The rename itself must survive a crash: sync the directory holding the new name.
        File::open(&dir)?.sync_all()
    }

    /// Removes a committed blob file; a missing file is not an error.
    pub(super) fn remove_blob(&self, digest: &Digest, size: u64) -> io::Result<()> {
        match fs::remove_file(self.blob_path(digest, size)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Length and modification time of a committed blob file.
    pub(super) fn stat_blob(&self, digest: &Digest, size: u64) -> io::Result<(u64, SystemTime)> {
        let meta = fs::symlink_metadata(self.blob_path(digest, size))?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok((
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        ))
    }

    /// Scans the store with `readdir` only (no per-file `stat`, so it is fast): removes temp
    /// files and drops files whose name is not a valid `<hex>.<size>` in the right shard.
    /// Lengths are checked afterwards ([`Store::stat_blob`], by the scrub) and on every open.
    pub(super) fn rebuild(&self) -> io::Result<Rebuilt> {
        let mut out = Rebuilt::default();
        for entry in fs::read_dir(self.tmp_dir())? {
            let entry = entry?;
            if remove_any(&entry.path()).is_ok() {
                out.temp_removed += 1;
            }
        }
        for alg in ALGORITHMS {
            let alg_dir = self.root.join("blobs").join(alg.as_str());
            for shard in fs::read_dir(&alg_dir)? {
                let shard = shard?;
                let shard_name = shard.file_name();
                let shard_ok = shard_name.len() == 2 && shard.file_type()?.is_dir();
                if !shard_ok {
                    let _ = remove_any(&shard.path());
                    out.dropped.push((None, "stray entry".into()));
                    continue;
                }
                for file in fs::read_dir(shard.path())? {
                    let file = file?;
                    let name = file.file_name();
                    let parsed = name
                        .to_str()
                        .and_then(|n| parse_blob_name(alg, n))
                        .filter(|(d, _)| shard_name.to_str() == Some(&d.hex()[..2]));
                    let Some((digest, size)) = parsed else {
                        let _ = remove_any(&file.path());
                        out.dropped.push((None, "unexpected file name".into()));
                        continue;
                    };
                    out.blobs.push(Found { digest, size });
                }
            }
        }
        Ok(out)
    }
}

fn parse_blob_name(alg: Algorithm, name: &str) -> Option<(Digest, u64)> {
    let (hex, size) = name.split_once('.')?;
    let size: u64 = size.parse().ok()?;
    let mut s = String::with_capacity(8 + hex.len());
    s.push_str(alg.as_str());
    s.push(':');
    s.push_str(hex);
    Some((Digest::parse(&s).ok()?, size))
}

fn remove_any(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Reads exactly `len` bytes at `offset` into a fresh buffer (one copy out of the kernel).
pub(super) fn read_exact_at(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    // An ordinary read never gives up: it returns bytes, end of file or an error.
    let buf = read_buf_at(len, offset, |buf, at| file.read_at(buf, at).map(Some))?;
    buf.map(Bytes::from)
        .ok_or_else(|| io::Error::other("cache file read gave up"))
}

/// Reads `len` bytes at `offset` only if the page cache has them all: `Ok(None)` when the read
/// would wait for the device (or the platform or filesystem cannot say), so the caller reads
/// on the blocking pool instead. `hold` (a budget's permit) lives as long as the bytes do.
///
/// Why: a hit is a stream of page-cache reads. Handing each one to the blocking pool costs two
/// thread wake-ups per chunk, more than the read itself; `RWF_NOWAIT` does the read on the
/// runtime thread when it cannot block, the way a file server's `sendfile` does.
pub(super) fn read_cached_at(
    file: &File,
    offset: u64,
    len: usize,
    hold: Option<tokio::sync::OwnedSemaphorePermit>,
) -> io::Result<Option<Bytes>> {
    #[cfg(target_os = "linux")]
    let read = |buf: &mut [u8], at: u64| {
        use rustix::io::{preadv2, Errno, ReadWriteFlags};
        match preadv2(
            file,
            &mut [io::IoSliceMut::new(buf)],
            at,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(n) => Ok(Some(n)),
            // Not (all) cached, or no RWF_NOWAIT here: the blocking read.
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    };
    #[cfg(not(target_os = "linux"))]
    let read = |_: &mut [u8], _: u64| Ok(None);
    let Some(buf) = read_buf_at(len, offset, read)? else {
        return Ok(None);
    };
    Ok(Some(match hold {
        Some(permit) => Bytes::from_owner(Held {
            buf,
            _permit: permit,
        }),
        None => Bytes::from(buf),
    }))
}

/// Fills a fresh `len`-byte buffer from `offset` with positioned reads (`read` returns the
/// bytes it read, or `None` to give up, and then so does this); a short file is an error.
fn read_buf_at(
    len: usize,
    offset: u64,
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<Option<usize>>,
) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match read(&mut buf[done..], offset + done as u64) {
            Ok(Some(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "cache file is shorter than expected",
                ))
            }
            Ok(Some(n)) => done += n,
            Ok(None) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(buf))
}

/// Bytes that keep a budget's permit until they are dropped.
struct Held {
    buf: Vec<u8>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// Appends chunks to a file, many per `writev`.
pub(super) fn write_chunks(file: &File, chunks: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    write_slices(file, &mut slices)
}

/// Appends `slices` to a file, as many per `writev` as the kernel takes.
pub(super) fn write_slices(mut file: &File, slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut rest = slices;
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file in the same dir, fsync, rename).
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent"))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_keeps_good_drops_truncated_and_temp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.create_dirs().unwrap();
        let good = Digest::sha256_of(b"good");
        let bad = Digest::sha256_of(b"bad!");
        let tmp = store.temp_path(&good, 1);
        let f = store.create_temp(&tmp).unwrap();
        write_chunks(&f, &[Bytes::from_static(b"good")]).unwrap();
        store.commit(&f, &tmp, &good, 4).unwrap();
        let tmp2 = store.temp_path(&bad, 2);
        let f2 = store.create_temp(&tmp2).unwrap();
        write_chunks(&f2, &[Bytes::from_static(b"bad!")]).unwrap();
        store.commit(&f2, &tmp2, &bad, 4).unwrap();
        // Truncate the second after commit; leave a temp file behind.
        File::options()
            .write(true)
            .open(store.blob_path(&bad, 4))
            .unwrap()
            .set_len(2)
            .unwrap();
        fs::write(store.temp_path(&bad, 3), b"partial").unwrap();
        fs::write(store.shard_dir(&good).join("../zz-not-a-shard"), b"x").unwrap();

        fs::write(store.shard_dir(&good).join("not-a-digest.4"), b"x").unwrap();
        let r = store.rebuild().unwrap();
        assert_eq!(r.blobs.len(), 2);
        assert_eq!(r.temp_removed, 1);
        assert_eq!(r.dropped.len(), 2);
        assert_eq!(
            store.stat_blob(&bad, 4).unwrap().0,
            2,
            "length checked by stat_blob"
        );
        assert_eq!(store.stat_blob(&good, 4).unwrap().0, 4);
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
        let f = File::open(store.blob_path(&good, 4)).unwrap();
        assert_eq!(&read_exact_at(&f, 1, 3).unwrap()[..], b"ood");
        assert!(read_exact_at(&f, 2, 3).is_err());
    }
}
