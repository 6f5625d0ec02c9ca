//! An append-only JSON-lines file: the persistence for links and tags.
//!
//! Each change appends one line (written to the OS, not fsynced: it survives a process crash,
//! the last changes before a power loss may be lost; both links and tags are re-learned from
//! upstream). A torn last line is skipped on load. [`JournalFile::rewrite`] compacts the file
//! atomically when the caller sees it has grown well past its live records.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The open journal file and how many lines it holds.
#[derive(Debug)]
pub(super) struct JournalFile {
    path: PathBuf,
    file: File,
    lines: u64,
}

impl JournalFile {
    /// Appends one record.
    pub(super) fn append<T: Serialize>(&mut self, rec: &T) -> io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.lines += 1;
        Ok(())
    }

    pub(super) fn lines(&self) -> u64 {
        self.lines
    }

    /// Replaces the file's content with `recs` (temp file, fsync, rename).
    pub(super) fn rewrite<T: Serialize>(
        &mut self,
        recs: impl IntoIterator<Item = T>,
    ) -> io::Result<()> {
        let tmp = self.path.with_extension("compact");
        let mut n = 0;
        {
            let mut w = io::BufWriter::new(File::create(&tmp)?);
            for r in recs {
                serde_json::to_writer(&mut w, &r).map_err(io::Error::other)?;
                w.write_all(b"\n")?;
                n += 1;
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = n;
        Ok(())
    }
}

/// A journal shared between tasks; all writes run on the blocking pool under one lock.
#[derive(Debug, Clone)]
pub(super) struct Journal {
    inner: Arc<Mutex<JournalFile>>,
}

impl Journal {
    /// Opens (creating) the journal and returns its records, skipping unreadable lines.
    pub(super) fn open<T: DeserializeOwned>(path: &Path) -> io::Result<(Journal, Vec<T>)> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let mut recs = Vec::new();
        let mut lines = 0;
        for line in BufReader::new(File::open(path)?).split(b'\n') {
            let line = line?;
            lines += 1;
            match serde_json::from_slice(&line) {
                Ok(r) => recs.push(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable journal line")
                }
            }
        }
        let jf = JournalFile {
            path: path.to_path_buf(),
            file,
            lines,
        };
        Ok((
            Journal {
                inner: Arc::new(Mutex::new(jf)),
            },
            recs,
        ))
    }

    /// Runs `f` with the file locked, on the blocking pool.
    pub(super) async fn with<R, F>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce(&mut JournalFile) -> io::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = inner
                .lock()
                .map_err(|_| io::Error::other("journal lock poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn append_reload_compact_and_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (j, recs) = Journal::open::<u32>(&path).unwrap();
        assert!(recs.is_empty());
        j.with(|f| {
            f.append(&1u32)?;
            f.append(&2u32)
        })
        .await
        .unwrap();
        // A torn write at the end is skipped.
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"3")
            .unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"x\n")
            .unwrap();
        let (j, recs) = Journal::open::<u32>(&path).unwrap();
        assert_eq!(recs, vec![1, 2]);
        j.with(|f| f.rewrite([7u32])).await.unwrap();
        j.with(|f| f.append(&8u32)).await.unwrap();
        let (_, recs) = Journal::open::<u32>(&path).unwrap();
        assert_eq!(recs, vec![7, 8]);
    }
}
