//! What `oci-proxy prewarm` shows while it runs: on a terminal, one status line per reference
//! and a total (bytes, rate), redrawn in place; otherwise (a pipe, a CI log) plain lines, one
//! when a reference starts and one when it ends. Either way each failed reference ends with its
//! reason.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::engine::Report;

/// How often the terminal display is redrawn.
pub(crate) const REDRAW: Duration = Duration::from_millis(200);

enum State {
    Waiting,
    Running,
    Done(Report),
}

pub(crate) struct Progress {
    tty: bool,
    started: Instant,
    bytes: AtomicU64,
    refs: Mutex<Vec<(String, State)>>,
    /// Lines the last redraw wrote (moved up over at the next one).
    drawn: Mutex<usize>,
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `ok: 2 manifests, 3 blobs (1 fetched), 1.2 MiB` or `FAILED (not_found): message`.
pub(crate) fn outcome(r: &Report) -> String {
    match &r.failure {
        None => format!(
            "ok: {} manifests, {} blobs ({} fetched), {}",
            r.manifests,
            r.blobs,
            r.fetched,
            human(r.bytes as f64)
        ),
        Some(f) => format!("FAILED ({}): {}", f.reason, f.message),
    }
}

impl Progress {
    pub(crate) fn new(labels: Vec<String>) -> Progress {
        Progress {
            tty: std::io::stdout().is_terminal(),
            started: Instant::now(),
            bytes: AtomicU64::new(0),
            refs: Mutex::new(labels.into_iter().map(|l| (l, State::Waiting)).collect()),
            drawn: Mutex::new(0),
        }
    }

    pub(crate) fn is_terminal(&self) -> bool {
        self.tty
    }

    pub(crate) fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn start(&self, i: usize) {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((label, state)) = refs.get_mut(i) {
            *state = State::Running;
            if !self.tty {
                println!("{label}: pulling");
            }
        }
    }

    pub(crate) fn finish(&self, i: usize, report: Report) {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((label, state)) = refs.get_mut(i) {
            if !self.tty {
                println!("{label}: {}", outcome(&report));
            }
            *state = State::Done(report);
        }
    }

    fn total_line(&self) -> String {
        let bytes = self.bytes.load(Ordering::Relaxed) as f64;
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let done = refs
            .iter()
            .filter(|(_, s)| matches!(s, State::Done(_)))
            .count();
        let failed = refs
            .iter()
            .filter(|(_, s)| matches!(s, State::Done(r) if r.failure.is_some()))
            .count();
        format!(
            "{done}/{} references done, {failed} failed; {} read, {}/s",
            refs.len(),
            human(bytes),
            human(bytes / secs)
        )
    }

    /// Redraws the terminal display (nothing when stdout is not a terminal).
    pub(crate) fn redraw(&self) {
        if !self.tty {
            return;
        }
        let total = self.total_line();
        let mut out = String::new();
        let mut drawn = self.drawn.lock().unwrap_or_else(|p| p.into_inner());
        if *drawn > 0 {
            out.push_str(&format!("\x1b[{}A", *drawn));
        }
        let refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        for (label, state) in refs.iter() {
            let status = match state {
                State::Waiting => "waiting".to_owned(),
                State::Running => "pulling…".to_owned(),
                State::Done(r) => outcome(r),
            };
            out.push_str(&format!("\x1b[2K{label}: {status}\n"));
        }
        out.push_str(&format!("\x1b[2K{total}\n"));
        *drawn = refs.len() + 1;
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }

    /// The last word: the final display on a terminal, the total line otherwise.
    pub(crate) fn done(&self) {
        if self.tty {
            self.redraw();
        } else {
            println!("{}", self.total_line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512.0), "512 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
