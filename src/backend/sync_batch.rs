//! Shared filesystem syncs for concurrent commits.
//!
//! A Commit may be acknowledged only once its data is on disk. Syncing the
//! whole filesystem (`syncfs`) covers every write that happened before the
//! sync *started*, so concurrent commits share one through
//! [`crate::rounds::Rounds`]: each caller waits for a sync round that began
//! after its call. The result is never weaker than one sync per commit.

use std::io;

use crate::rounds::Rounds;

/// An I/O error as a round remembers it for every caller it covers
/// (`io::Error` itself cannot be cloned).
#[derive(Clone, Copy)]
struct SyncError {
    kind: io::ErrorKind,
    errno: Option<i32>,
}

impl From<SyncError> for io::Error {
    fn from(e: SyncError) -> Self {
        match e.errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::from(e.kind),
        }
    }
}

/// Coalesces syncs of one filesystem.
#[derive(Default)]
pub struct SyncBatcher {
    rounds: Rounds<(), SyncError>,
}

impl SyncBatcher {
    /// Makes every write that happened before this call durable, by running
    /// `sync` (e.g. `syncfs(2)`) or waiting for a round of another caller
    /// that started after this call.
    pub fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        self.rounds
            .run(|| {
                sync().map_err(|e| SyncError {
                    kind: e.kind(),
                    errno: e.raw_os_error(),
                })
            })
            .map_err(io::Error::from)
    }

    /// How many sync rounds ran.
    pub fn rounds(&self) -> u64 {
        self.rounds.rounds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_round_gives_its_errno_and_the_next_round_recovers() {
        let b = SyncBatcher::default();
        let e = b
            .sync(|| Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        b.sync(|| Ok(())).unwrap();
        assert_eq!(b.rounds(), 2);
    }
}
