//! Destroying removed snapshots' objects after Remove has replied.
//!
//! Remove drops the record first (durably); from then on the object is an
//! orphan that nothing refers to, and destroying it is housekeeping that
//! the client need not wait for. On backends that allow it
//! ([`Backend::destroy_in_background`]) the core hands the object to this
//! queue, which one worker thread empties in order. Whatever is still queued
//! when the process dies is an orphan that startup repair destroys; Cleanup
//! first waits for what was queued before it (see docs/design.md, Remove).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::warn;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::model::SnapshotId;

#[derive(Default)]
struct State {
    /// Objects waiting: snapshot id and the backend's own id.
    queue: VecDeque<(SnapshotId, u64)>,
    /// The object being destroyed now.
    busy: Option<SnapshotId>,
    /// Objects queued so far, and destroyed (or given up on) so far: every
    /// object up to number `finished` in queue order is done.
    queued: u64,
    finished: u64,
    /// No more objects come; the worker exits once the queue is empty.
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    backend: Arc<dyn Backend>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update keeps the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Destroys one object; a failure leaves it for Cleanup, as a failed
    /// destroy always did.
    fn destroy(&self, id: SnapshotId, native: u64) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.backend.destroy(id, native)
        }))
        .unwrap_or_else(|_| Err(Error::Internal("destroying the object panicked".into())));
        if let Err(e) = result {
            warn!(
                id = %id,
                error = %e,
                "snapshot removed from metadata; its object could not be destroyed now and is left for Cleanup"
            );
        }
    }
}

/// The queue and its worker thread.
pub struct DestroyQueue {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl DestroyQueue {
    /// Starts the worker thread.
    pub fn start(backend: Arc<dyn Backend>) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            backend,
        });
        let for_worker = shared.clone();
        let worker = std::thread::Builder::new()
            .name("cowsnap-destroy".into())
            .spawn(move || work(&for_worker))
            .map_err(|e| Error::io("starting the destroy thread", e))?;
        Ok(DestroyQueue {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Queues the object of a removed snapshot (its record must already be
    /// gone, durably).
    pub fn push(&self, id: SnapshotId, native: u64) {
        let mut st = self.shared.lock();
        if st.closing {
            // Shutting down: nobody would destroy it but startup repair.
            drop(st);
            self.shared.destroy(id, native);
            return;
        }
        st.queue.push_back((id, native));
        st.queued += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Ids queued or being destroyed: objects without a record that are
    /// not orphans to report or destroy elsewhere.
    pub fn pending(&self) -> HashSet<SnapshotId> {
        let st = self.shared.lock();
        st.queue.iter().map(|(id, _)| *id).chain(st.busy).collect()
    }

    /// Waits until every object queued before this call is done with.
    pub fn drain(&self) {
        let mut st = self.shared.lock();
        let target = st.queued;
        while st.finished < target {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Destroys what is queued and stops the worker. Later pushes destroy
    /// at once.
    pub fn shutdown(&self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = worker
            && w.join().is_err()
        {
            warn!("the destroy thread panicked; startup repair destroys what it left");
        }
    }
}

impl Drop for DestroyQueue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work(shared: &Shared) {
    loop {
        let (id, native) = {
            let mut st = shared.lock();
            loop {
                if let Some(next) = st.queue.pop_front() {
                    st.busy = Some(next.0);
                    break next;
                }
                if st.closing {
                    return;
                }
                st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        shared.destroy(id, native);
        // An armed `error` here has nothing to fail: the Remove replied.
        let _ = failpoint::hit("remove.after_fs");
        let mut st = shared.lock();
        st.busy = None;
        st.finished += 1;
        drop(st);
        shared.changed.notify_all();
    }
}
