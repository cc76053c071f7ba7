//! Progress of a long operator command (bulk revocation, dead-letter replay): a bar with counts,
//! rate and time left on a terminal; on anything else, a plain line every few seconds and at the
//! end, so logs and CI output stay readable.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Progress of `total` items (unknown total: `None`).
pub struct Progress {
    what: &'static str,
    bar: Option<ProgressBar>,
    done: u64,
    total: Option<u64>,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Starts reporting on stderr.
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = total.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
            let template = match total {
                Some(_) => "{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
                None => "{msg} {spinner} {pos} ({per_sec})",
            };
            bar.set_style(ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> "));
            bar.set_message(what);
            bar
        });
        let now = Instant::now();
        Progress { what, bar, done: 0, total, started: now, last_line: now }
    }

    /// `n` more items done.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    /// Ends the bar (or writes the last line).
    pub fn finish(self) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => eprintln!("{}", self.line()),
        }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let of = self.total.map_or(String::new(), |t| format!("/{t}"));
        format!("{}: {}{of} ({:.0}/s)", self.what, self.done, self.done as f64 / secs)
    }
}
