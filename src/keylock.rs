//! Per-key locks: operations on the same key (or name) wait for each other,
//! operations on different keys never do.
//!
//! A lock over several keys is taken all at once (wait until none is held,
//! then take them all), so two operations locking overlapping sets cannot
//! deadlock. The lock table is a small set guarded by a mutex that is held
//! only while looking at the set, never across filesystem work.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The table of held keys.
#[derive(Default)]
pub struct KeyLocks {
    held: Mutex<HashSet<String>>,
    released: Condvar,
}

/// Holds some keys until dropped.
pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    keys: Vec<String>,
}

impl KeyLocks {
    /// Waits until none of `keys` is held, then holds them all.
    pub fn lock(&self, keys: &[&str]) -> KeyGuard<'_> {
        let mut held = self.table();
        while keys.iter().any(|k| held.contains(*k)) {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let mut owned = Vec::with_capacity(keys.len());
        for k in keys {
            if held.insert((*k).to_owned()) {
                owned.push((*k).to_owned());
            }
        }
        KeyGuard {
            locks: self,
            keys: owned,
        }
    }

    /// Whether `key` is held right now (a snapshot in the middle of an
    /// operation). Only a hint: it may change right after.
    pub fn is_held(&self, key: &str) -> bool {
        self.table().contains(key)
    }

    fn table(&self) -> MutexGuard<'_, HashSet<String>> {
        // A panic while holding the table lock cannot leave the set
        // half-updated (every update is a single insert or remove).
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.table();
        for k in &self.keys {
            held.remove(k);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn same_key_is_exclusive() {
        let locks = Arc::new(KeyLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let _g = locks.lock(&["k"]);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn different_keys_do_not_wait() {
        let locks = KeyLocks::default();
        let _a = locks.lock(&["a"]);
        let _b = locks.lock(&["b"]);
    }

    #[test]
    fn overlapping_multi_key_locks_do_not_deadlock() {
        let locks = Arc::new(KeyLocks::default());
        let t1 = {
            let locks = locks.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let _g = locks.lock(&["a", "b"]);
                }
            })
        };
        let t2 = {
            let locks = locks.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let _g = locks.lock(&["b", "a"]);
                    std::thread::sleep(Duration::from_micros(10));
                }
            })
        };
        t1.join().unwrap();
        t2.join().unwrap();
    }

    #[test]
    fn duplicate_keys_in_one_lock_are_held_once() {
        let locks = KeyLocks::default();
        {
            let _g = locks.lock(&["a", "a"]);
        }
        let _g = locks.lock(&["a"]);
    }
}
