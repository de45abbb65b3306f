//! Shared rounds of an expensive flush, for concurrent callers.
//!
//! A flush such as `syncfs(2)` or a durable metadata commit makes durable
//! everything that happened before it *started*, so callers that need one
//! can share it: each caller takes a [`Ticket`] once its own write is done,
//! then waits for a round that began after the ticket was issued. One caller
//! at a time runs (leads) the round; the others wait for it, or for the next
//! one if theirs came too late for the running round.
//!
//! The guarantee is the same as one flush per caller: a caller returns only
//! the result of a round that started after it took its ticket. Two users:
//! the btrfs backend's shared `syncfs` (`backend/sync_batch.rs`) and the
//! metadata's group commit (`meta.rs`).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long [`Rounds::wait_for_leader`] leaves a round to others before
/// leading one itself, by default.
const PATIENCE: Duration = Duration::from_millis(50);

/// How many finished rounds are remembered for callers still waking up. A
/// caller whose round was forgotten waits for a new one (never wrong: a
/// later round covers it too).
const HISTORY: usize = 64;

/// A caller's place in line: rounds that start after it was issued cover
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

struct Finished<T, E> {
    /// Tickets in (from, to] were covered by this round.
    from: u64,
    to: u64,
    result: Result<T, E>,
}

struct State<T, E> {
    /// Tickets handed out so far.
    issued: u64,
    /// Every ticket up to this one is covered by a finished round.
    done: u64,
    /// A round is running.
    running: bool,
    /// The last finished rounds, most recent last.
    history: VecDeque<Finished<T, E>>,
    /// Rounds run (for tests and metrics).
    rounds: u64,
}

/// Coalesces flushes of one thing (a filesystem, a database). A round's
/// result (`T`, or the error `E`) is handed to every caller it covers.
pub struct Rounds<T, E> {
    state: Mutex<State<T, E>>,
    finished: Condvar,
    patience: Duration,
}

impl<T: Clone, E: Clone> Default for Rounds<T, E> {
    fn default() -> Self {
        Rounds {
            state: Mutex::new(State {
                issued: 0,
                done: 0,
                running: false,
                history: VecDeque::with_capacity(HISTORY),
                rounds: 0,
            }),
            finished: Condvar::new(),
            patience: PATIENCE,
        }
    }
}

impl<T: Clone, E: Clone> Rounds<T, E> {
    /// Rounds whose [`Self::wait_for_leader`] leaves a round to others for
    /// `patience` at most (50 ms by default).
    pub fn with_patience(patience: Duration) -> Self {
        Rounds {
            patience,
            ..Self::default()
        }
    }

    /// Takes a ticket: every round that starts after this call covers it.
    /// Never blocks for long (one mutex), so it may be called while holding
    /// something a round needs, such as a write transaction the round must
    /// wait for.
    pub fn ticket(&self) -> Ticket {
        let mut st = self.lock();
        st.issued += 1;
        Ticket(st.issued)
    }

    /// Takes a ticket and waits for a round covering it (see [`Self::wait`]).
    pub fn run(&self, round: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let ticket = self.ticket();
        self.wait(ticket, round)
    }

    /// Returns the result of a round that started after `ticket` was
    /// issued: one running or finished meanwhile, or one this caller runs
    /// with `round`.
    pub fn wait(&self, ticket: Ticket, round: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.wait_for_leader(ticket, || true, round)
    }

    /// Like [`Self::wait`], but leads a round only when `may_lead` says so
    /// (checked under the rounds' lock), leaving the round to someone else
    /// meanwhile, e.g. to a writer still in flight whose own commit will
    /// cover this ticket. Whoever makes `may_lead` true must call
    /// [`Self::nudge`]. After its patience without progress it leads
    /// anyway, so a wrong `may_lead` costs a round, never a stall.
    pub fn wait_for_leader(
        &self,
        ticket: Ticket,
        may_lead: impl Fn() -> bool,
        round: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut ticket = ticket.0;
        let mut st = self.lock();
        loop {
            if st.done >= ticket {
                if let Some(f) = st
                    .history
                    .iter()
                    .rev()
                    .find(|f| ticket > f.from && ticket <= f.to)
                {
                    return f.result.clone();
                }
                // Its round's result was forgotten: any later round covers
                // it as well.
                st.issued += 1;
                ticket = st.issued;
                continue;
            }
            if !st.running && may_lead() {
                break;
            }
            let (next, waited) = self
                .finished
                .wait_timeout(st, self.patience)
                .unwrap_or_else(|p| p.into_inner());
            st = next;
            if waited.timed_out() && !st.running && st.done < ticket {
                break;
            }
        }
        self.lead(st, round)
    }

    /// Wakes the waiters of [`Self::wait_for_leader`] to check `may_lead`
    /// again.
    pub fn nudge(&self) {
        // Under the lock: a waiter checks `may_lead` and starts waiting
        // without releasing it, so it cannot miss this.
        let _st = self.lock();
        self.finished.notify_all();
    }

    /// Runs `round` now, as the round covering every ticket issued so far,
    /// if no round is running; otherwise returns None without running it.
    /// For a caller whose own commit can serve as the round (it took its
    /// ticket before, and holds what a round would have to wait for).
    pub fn lead_if_idle(&self, round: impl FnOnce() -> Result<T, E>) -> Option<Result<T, E>> {
        let st = self.lock();
        if st.running {
            return None;
        }
        Some(self.lead(st, round))
    }

    /// Leads a round covering every ticket issued so far.
    fn lead(
        &self,
        mut st: MutexGuard<'_, State<T, E>>,
        round: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        st.running = true;
        let from = st.done;
        let covers = st.issued;
        drop(st);
        let leading = Leading { rounds: self };
        let result = round();
        std::mem::forget(leading);
        let mut st = self.lock();
        st.running = false;
        st.done = covers;
        st.rounds += 1;
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back(Finished {
            from,
            to: covers,
            result: result.clone(),
        });
        drop(st);
        self.finished.notify_all();
        result
    }

    /// How many rounds ran.
    pub fn rounds(&self) -> u64 {
        self.lock().rounds
    }

    fn lock(&self) -> MutexGuard<'_, State<T, E>> {
        // Every update keeps the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets waiters lead a new round if a leader's round panics (the panic
/// unwinds through the leader; its tickets stay uncovered).
struct Leading<'a, T: Clone, E: Clone> {
    rounds: &'a Rounds<T, E>,
}

impl<T: Clone, E: Clone> Drop for Leading<'_, T, E> {
    fn drop(&mut self) {
        self.rounds.lock().running = false;
        self.rounds.finished.notify_all();
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
        let r: Rounds<u32, ()> = Rounds::default();
        assert_eq!(r.run(|| Ok(7)), Ok(7));
        assert_eq!(r.rounds(), 1);
    }

    #[test]
    fn concurrent_callers_share_rounds_and_each_waits_for_a_later_start() {
        let r: Arc<Rounds<(), ()>> = Arc::new(Rounds::default());
        // Each "write" bumps `written`; a round records how many writes it
        // covered when it started. Every caller must return after a round
        // that started after its write.
        let written = Arc::new(AtomicU64::new(0));
        let covered = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (r, written, covered) = (r.clone(), written.clone(), covered.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        r.run(|| {
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
        assert!(r.rounds() < 320, "rounds were shared: {}", r.rounds());
    }

    #[test]
    fn a_ticket_taken_before_a_round_starts_gets_that_rounds_result() {
        let r: Arc<Rounds<u64, ()>> = Arc::new(Rounds::default());
        let t = r.ticket();
        // Another caller leads a round that started after `t`: its result
        // (here the round's number) is `t`'s.
        assert_eq!(r.run(|| Ok(1)), Ok(1));
        assert_eq!(r.wait(t, || Ok(2)), Ok(1));
        assert_eq!(r.rounds(), 1);
    }

    #[test]
    fn leading_when_idle_covers_earlier_tickets_and_is_refused_while_a_round_runs() {
        let r: Arc<Rounds<u64, ()>> = Arc::new(Rounds::default());
        let earlier = r.ticket();
        let _mine = r.ticket();
        assert_eq!(r.lead_if_idle(|| Ok(5)), Some(Ok(5)));
        // The earlier ticket was covered by that round.
        assert_eq!(r.wait(earlier, || Ok(6)), Ok(5));
        // While a round runs, nobody else may lead one.
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let r2 = r.clone();
        let leader = std::thread::spawn(move || {
            r2.run(|| {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok(7)
            })
        });
        started_rx.recv().unwrap();
        assert_eq!(r.lead_if_idle(|| Ok(8)), None);
        release_tx.send(()).unwrap();
        assert_eq!(leader.join().unwrap(), Ok(7));
        assert_eq!(r.rounds(), 2);
    }

    #[test]
    fn a_waiter_leaves_the_round_to_a_writer_in_flight_until_nudged() {
        let r: Arc<Rounds<u64, ()>> = Arc::new(Rounds::with_patience(Duration::from_secs(60)));
        let others_in_flight = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let t = r.ticket();
        let (r2, flag) = (r.clone(), others_in_flight.clone());
        let waiter = std::thread::spawn(move || {
            r2.wait_for_leader(t, || !flag.load(Ordering::SeqCst), || Ok(1))
        });
        std::thread::sleep(Duration::from_millis(20));
        // The writer in flight commits as a round covering the ticket.
        let _its_own = r.ticket();
        assert_eq!(r.lead_if_idle(|| Ok(2)), Some(Ok(2)));
        assert_eq!(waiter.join().unwrap(), Ok(2));
        // Nobody left in flight: a nudged waiter leads.
        let t = r.ticket();
        let (r2, flag) = (r.clone(), others_in_flight.clone());
        let waiter = std::thread::spawn(move || {
            r2.wait_for_leader(t, || !flag.load(Ordering::SeqCst), || Ok(3))
        });
        std::thread::sleep(Duration::from_millis(10));
        others_in_flight.store(false, Ordering::SeqCst);
        r.nudge();
        assert_eq!(waiter.join().unwrap(), Ok(3));
        assert_eq!(r.rounds(), 2);
    }

    #[test]
    fn a_waiter_leads_after_its_patience_even_if_told_not_to() {
        let r: Rounds<u64, ()> = Rounds::default();
        let t = r.ticket();
        assert_eq!(r.wait_for_leader(t, || false, || Ok(4)), Ok(4));
    }

    #[test]
    fn a_failed_round_fails_its_callers_and_the_next_round_recovers() {
        let r: Rounds<(), i32> = Rounds::default();
        assert_eq!(r.run(|| Err(libc::EIO)), Err(libc::EIO));
        r.run(|| Ok(())).unwrap();
    }

    #[test]
    fn a_panicking_leader_lets_the_next_caller_lead() {
        let r: Arc<Rounds<(), ()>> = Arc::new(Rounds::default());
        let t = r.ticket();
        let r2 = r.clone();
        let led = std::thread::spawn(move || {
            let _ = r2.run(|| panic!("round failed by panicking"));
        })
        .join();
        assert!(led.is_err());
        // The ticket was covered by no finished round: it gets a new one.
        r.wait(t, || Ok(())).unwrap();
        assert_eq!(r.rounds(), 1);
    }
}
