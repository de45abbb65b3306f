//! Shared filesystem syncs for concurrent commits.
//!
//! A Commit may be acknowledged only once its data is on disk. Syncing the
//! whole filesystem (`syncfs`) covers every write that happened before the
//! sync *started*, so concurrent commits can share one: each caller takes a
//! ticket, and waits for a sync round that began after its ticket was
//! issued. One caller at a time runs the round; the others wait for it (or
//! for the next one, if theirs came too late for the running round).
//!
//! The result is never weaker than one sync per commit: a caller returns
//! only after a sync that started after its call returned successfully.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

/// How many failed rounds are remembered for callers still waking up.
const MAX_FAILED: usize = 64;

#[derive(Clone, Copy)]
struct FailedRound {
    from: u64,
    to: u64,
    kind: io::ErrorKind,
    errno: Option<i32>,
}

#[derive(Default)]
struct State {
    /// Tickets handed out so far.
    issued: u64,
    /// Every ticket up to this one is covered by a finished round.
    done: u64,
    /// A round is running.
    running: bool,
    /// Failed rounds (most recent last, at most [`MAX_FAILED`]): tickets in
    /// (from, to] got the error.
    failed: Vec<FailedRound>,
    /// Rounds run (for tests and metrics).
    rounds: u64,
}

/// Coalesces syncs of one filesystem.
#[derive(Default)]
pub struct SyncBatcher {
    state: Mutex<State>,
    finished: Condvar,
}

impl SyncBatcher {
    /// Makes every write that happened before this call durable, by running
    /// `sync` (e.g. `syncfs(2)`) or waiting for a round of another caller
    /// that started after this call.
    pub fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut st = self.lock();
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.done >= ticket {
                return match st
                    .failed
                    .iter()
                    .rev()
                    .find(|f| ticket > f.from && ticket <= f.to)
                {
                    Some(f) => Err(match f.errno {
                        Some(e) => io::Error::from_raw_os_error(e),
                        None => io::Error::from(f.kind),
                    }),
                    None => Ok(()),
                };
            }
            if !st.running {
                break;
            }
            st = self.finished.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        // Lead a round covering every ticket issued so far.
        st.running = true;
        let from = st.done;
        let covers = st.issued;
        drop(st);
        let result = sync();
        let mut st = self.lock();
        st.running = false;
        st.done = covers;
        st.rounds += 1;
        if let Err(e) = &result {
            if st.failed.len() == MAX_FAILED {
                st.failed.remove(0);
            }
            st.failed.push(FailedRound {
                from,
                to: covers,
                kind: e.kind(),
                errno: e.raw_os_error(),
            });
        }
        drop(st);
        self.finished.notify_all();
        result
    }

    /// How many sync rounds ran.
    pub fn rounds(&self) -> u64 {
        self.lock().rounds
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update keeps the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn a_lone_caller_runs_its_own_round() {
        let b = SyncBatcher::default();
        let n = AtomicU64::new(0);
        b.sync(|| {
            n.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(b.rounds(), 1);
    }

    #[test]
    fn concurrent_callers_share_rounds_and_each_waits_for_a_later_start() {
        let b = Arc::new(SyncBatcher::default());
        // Each "write" bumps `written`; a round records how many writes it
        // covered when it started. Every caller must return after a round
        // that started after its write.
        let written = Arc::new(AtomicU64::new(0));
        let covered = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (b, written, covered) = (b.clone(), written.clone(), covered.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        b.sync(|| {
                            let start = written.load(Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(2));
                            covered.fetch_max(start, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                        assert!(
                            covered.load(Ordering::SeqCst) >= mine,
                            "returned before its write was covered"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(b.rounds() < 320, "rounds were shared: {}", b.rounds());
    }

    #[test]
    fn a_failed_round_fails_its_callers_and_the_next_round_recovers() {
        let b = SyncBatcher::default();
        let e = b
            .sync(|| Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        b.sync(|| Ok(())).unwrap();
    }
}
