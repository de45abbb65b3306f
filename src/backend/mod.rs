//! Filesystem backends.
//!
//! A backend knows filesystem objects only: it is told an object's
//! [`SnapshotId`] and kind, never a client's key or labels. Each object lives
//! in one of three areas by kind (active, view, committed) under a name
//! derived from its id, so the backend can list what exists after a crash
//! and the core can reconcile it with the metadata (see docs/design.md).
//!
//! Two backends: [`btrfs`] (subvolumes, read-only flag) and [`zfs`] (datasets,
//! clones of `@` snapshots, `readonly=on`).

pub mod btrfs;
pub mod sync_batch;
pub mod zfs;

use crate::error::{Error, Result};
use crate::meta::ObjectRef;
use crate::model::{Kind, Mount, SnapshotId, Usage};

/// An object a backend found on disk while scanning its areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundObject {
    /// The snapshot id its name encodes.
    pub id: SnapshotId,
    /// The area it was found in.
    pub area: Kind,
    /// Whether it is frozen (read-only).
    pub readonly: bool,
    /// The backend's own id of the object.
    pub native: u64,
}

/// What a backend cleanup pass reclaimed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCleanup {
    /// Stale accounting entries (e.g. btrfs qgroups of deleted subvolumes)
    /// removed.
    pub stale_accounting_removed: u64,
}

/// Live space figures of one object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectSpace {
    /// Bytes only this object holds.
    pub exclusive: u64,
    /// Bytes this object refers to, shared or not.
    pub referenced: u64,
}

/// Space figures of the whole filesystem (or pool).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilesystemSpace {
    /// Size of the filesystem.
    pub total: u64,
    /// Bytes in use.
    pub used: u64,
}

/// State of the backend's space accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountingState {
    /// "simple", "full", or the backend's own name.
    pub mode: String,
    /// False when the filesystem says its figures are wrong until repaired.
    pub consistent: bool,
}

/// Filesystem operations the snapshotter core needs.
///
/// Every method is a blocking system call or a few of them; the core calls
/// them without holding any lock or transaction that other snapshots need.
pub trait Backend: Send + Sync {
    /// A one-line description for logs (filesystem, quota mode, ...).
    fn describe(&self) -> String;

    /// Creates the object of a new active snapshot (writable) or view
    /// (read-only): a copy-on-write clone of `parent`, or an empty one whose
    /// root directory has mode 0755.
    fn create(&self, id: SnapshotId, kind: Kind, parent: Option<&ObjectRef>) -> Result<ObjectRef>;

    /// Freezes an active object into a committed one: makes its data
    /// durable, makes it read-only and moves it to the committed area.
    /// Returns its usage measured after the data reached the disk.
    fn commit(&self, obj: &ObjectRef) -> Result<Usage>;

    /// Puts an object found in `found.area` (possibly half-way through a
    /// commit) into the state of `kind`: its area and its read-only flag.
    /// Used to undo a commit whose metadata step failed, and by repair.
    fn reconcile(&self, found: &FoundObject, kind: Kind) -> Result<()>;

    /// Destroys the object of a snapshot, including anything nested in it
    /// (subvolumes a container created). An object that is already gone is
    /// not an error.
    fn destroy(&self, id: SnapshotId, native: u64) -> Result<()>;

    /// Whether Remove may destroy objects after replying (by a background
    /// worker, see `destroy_queue.rs`) rather than before. False by default:
    /// the destroy runs inside the Remove call.
    fn destroy_in_background(&self) -> bool {
        false
    }

    /// Current usage of an active object or view (the figure for a
    /// committed snapshot is stored at commit).
    fn usage(&self, obj: &ObjectRef, kind: Kind) -> Result<Usage>;

    /// The mounts that give a client the object's filesystem.
    fn mounts(&self, obj: &ObjectRef, kind: Kind) -> Result<Vec<Mount>>;

    /// Every object in the backend's areas.
    fn scan(&self) -> Result<Vec<FoundObject>>;

    /// Reclaims backend-level garbage that no object owns any more.
    fn cleanup(&self, live: &[FoundObject]) -> Result<BackendCleanup>;

    /// Live space figures of an object, of any kind. Cheap (no file walk,
    /// no per-file work): called for every snapshot by the usage report.
    fn space(&self, _obj: &ObjectRef) -> Result<ObjectSpace> {
        Err(Error::Unimplemented(
            "space figures are not available on this backend".into(),
        ))
    }

    /// Sets (`Some`) or clears (`None`) the object's size limit: writes
    /// beyond it fail with EDQUOT.
    fn set_limit(&self, _obj: &ObjectRef, _limit: Option<u64>) -> Result<()> {
        Err(Error::Unimplemented(
            "size limits are not available on this backend".into(),
        ))
    }

    /// Space figures of the whole filesystem or pool.
    fn filesystem_space(&self) -> Result<FilesystemSpace> {
        Err(Error::Unimplemented(
            "filesystem figures are not available on this backend".into(),
        ))
    }

    /// State of the space accounting.
    fn accounting(&self) -> Result<AccountingState> {
        Ok(AccountingState {
            mode: "none".into(),
            consistent: true,
        })
    }

    /// Starts a repair of inconsistent accounting (a btrfs quota rescan).
    fn repair_accounting(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the object is there (a record's object can be deleted
    /// outside cowsnap). Cheap: one lookup.
    fn exists(&self, _obj: &ObjectRef, _kind: Kind) -> Result<bool> {
        Ok(true)
    }

    /// Where the object is, for people: a path or a dataset name.
    fn location(&self, obj: &ObjectRef, kind: Kind) -> String {
        format!("{kind}/{}", obj.id)
    }

    /// Whether objects are btrfs subvolumes, which export can send and
    /// import receive as `btrfs send` streams (the btrfs-send format).
    fn btrfs_send(&self) -> bool {
        false
    }

    /// Takes over, as the committed object of snapshot `id`, an object that
    /// a native receive (`btrfs receive`) made at `staged`: a path (or a
    /// dataset name) on the backend's filesystem, outside its areas. Moves
    /// it into the committed area, read-only, with its data durable, and
    /// measures it; `parent` is the committed object an incremental stream
    /// was received onto. Until it returns the staged object is the
    /// caller's; once moved it is the object of `id` (an orphan if no
    /// record follows). Used by import (src/transfer/).
    fn adopt(
        &self,
        _id: SnapshotId,
        _staged: &str,
        _parent: Option<&ObjectRef>,
    ) -> Result<(ObjectRef, Usage)> {
        Err(Error::Unimplemented(
            "importing a native stream is not available on this backend".into(),
        ))
    }
}
