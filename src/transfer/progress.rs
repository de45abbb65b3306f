//! Progress of a long transfer: a bar on stderr (bytes, rate, and with a
//! known total the percentage and time left) when stderr is a terminal,
//! nothing at all otherwise, so scripts and logs stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress display; cheap to clone (clones share the bar).
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar labelled `what`, for `total` bytes if known; hidden unless
    /// stderr is a terminal.
    pub fn new(what: &str, total: Option<u64>) -> Progress {
        Self::with_terminal(what, total, std::io::stderr().is_terminal())
    }

    /// Like [`Progress::new`], with the terminal test given.
    pub fn with_terminal(what: &str, total: Option<u64>, terminal: bool) -> Progress {
        if !terminal {
            return Progress {
                bar: ProgressBar::hidden(),
            };
        }
        let (bar, template) = match total {
            Some(t) => (
                ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                "{spinner} {msg} {binary_bytes} {binary_bytes_per_sec} {elapsed}",
            ),
        };
        // The templates are constants: a parse failure is a bug, shown as a
        // plain bar rather than a panic.
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = bar.with_style(style).with_message(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// Whether anything is drawn.
    pub fn is_visible(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// Counts `n` more bytes.
    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Bytes counted so far.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_drawn_off_a_terminal_but_bytes_are_counted() {
        let p = Progress::with_terminal("export", Some(10), false);
        assert!(!p.is_visible());
        p.add(4);
        p.add(3);
        assert_eq!(p.position(), 7);
        p.finish();
    }
}
