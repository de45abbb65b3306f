//! The snapshotter core: containerd's snapshot lifecycle over a metadata
//! store and a filesystem backend.
//!
//! # The model
//!
//! A snapshot is a filesystem tree with a key. There are three kinds:
//!
//! - **active** (`Prepare(key, parent)`): a writable copy-on-write clone of a
//!   committed parent, or an empty tree. A client mounts it, writes (unpacks
//!   a layer, runs a container) and then either commits or removes it.
//! - **committed** (`Commit(name, key)`): an active snapshot frozen under a
//!   new name; the key is gone afterwards. Only committed snapshots can be
//!   parents, and a committed snapshot with children cannot be removed.
//! - **view** (`View(key, parent)`): a read-only clone of a committed parent.
//!
//! Keys and names share one key space. Unpacking an image prepares
//! `extract-<random> <chainID>` on the previous layer's chain id, applies
//! the layer's tar through the mounts and commits it as `<chainID>`;
//! running a container prepares its rootfs on the image's top layer.
//!
//! # Concurrency and crash safety
//!
//! Each mutation takes the per-key locks of the keys it touches (never the
//! parent's: many containers share a parent), checks the metadata, does the
//! filesystem step with no transaction open, then commits exactly one
//! metadata write transaction that re-checks what it depends on. The order
//! of filesystem and metadata steps per operation, and what startup repair
//! does after a crash at each point, is in docs/design.md; the failpoint
//! names used in tests are in [`crate::failpoint::POINTS`].

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, error, info, warn};

use crate::backend::{Backend, FoundObject};
use crate::destroy_queue::DestroyQueue;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::filter::{FilterSet, SnapshotFields};
use crate::idmap::IdMapping;
use crate::keylock::KeyLocks;
use crate::meta::{MetaStore, Record, remove_with_children};
use crate::model::{
    Info, Kind, Labels, Mount, SnapshotId, Timestamp, Usage, truncate_for_message, validate_key,
    validate_labels,
};

/// File name of the metadata database inside the root.
pub const METADATA_FILE: &str = "metadata.redb";

/// What startup repair (or Cleanup) found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Filesystem objects without a record, destroyed.
    pub orphans_destroyed: u64,
    /// Orphans whose destruction failed (left for the next Cleanup).
    pub orphans_failed: u64,
    /// Active or view records whose object was missing, dropped.
    pub records_dropped: Vec<String>,
    /// Objects moved back to the state their record says (an interrupted
    /// commit undone or finished).
    pub objects_reconciled: u64,
    /// Committed records whose object is missing: kept (children depend on
    /// them) and reported; data was lost outside cowsnap.
    pub committed_missing: Vec<String>,
    /// Stale backend accounting entries removed.
    pub stale_accounting_removed: u64,
    /// Exclusive bytes the destroyed orphans held, as last accounted.
    pub reclaimed_bytes: u64,
}

impl RepairReport {
    /// True when nothing needed doing.
    pub fn is_clean(&self) -> bool {
        *self == RepairReport::default()
    }
}

/// The snapshotter: owns the metadata and the backend.
pub struct Snapshotter {
    pub(crate) meta: MetaStore,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) locks: KeyLocks,
    /// Ids whose object is being created and has no record yet: Cleanup
    /// must not mistake them for orphans.
    creating: Mutex<HashSet<SnapshotId>>,
    /// Objects of removed snapshots, destroyed after Remove replied (on
    /// backends that allow it; `None`: Remove destroys before replying).
    destroys: Option<DestroyQueue>,
    next_id: AtomicU64,
    root: std::path::PathBuf,
    started: Timestamp,
}

/// The label with which containerd (2.x) asks for a size limit on Prepare.
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

impl Snapshotter {
    /// Opens the metadata in `root` with `backend`, and repairs what a crash
    /// may have left (see docs/design.md). Nothing may be in flight: this
    /// runs before the daemon serves.
    pub fn open(root: &Path, backend: Box<dyn Backend>) -> Result<(Self, RepairReport)> {
        let path = root.join(METADATA_FILE);
        refuse_new_metadata_over_objects(&path, backend.as_ref())?;
        let meta = MetaStore::open(&path)?;
        let next = meta.next_id()?;
        let backend: Arc<dyn Backend> = Arc::from(backend);
        let mut s = Snapshotter {
            meta,
            backend,
            locks: KeyLocks::default(),
            creating: Mutex::new(HashSet::new()),
            destroys: None,
            next_id: AtomicU64::new(next),
            root: root.to_owned(),
            started: Timestamp::now(),
        };
        let report = s.repair()?;
        if s.backend.destroy_in_background() {
            s.destroys = Some(DestroyQueue::start(s.backend.clone())?);
        }
        Ok((s, report))
    }

    /// The backend's description.
    pub fn describe_backend(&self) -> String {
        self.backend.describe()
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// When this instance opened.
    pub fn started(&self) -> Timestamp {
        self.started
    }

    /// Creates an active snapshot `key` on `parent` (empty: no parent) and
    /// returns its mounts.
    pub fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view `key` of `parent` and returns its mounts.
    pub fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        validate_key("key", key)?;
        let labels = normalize_labels(labels);
        validate_labels(&labels)?;
        if !parent.is_empty() {
            validate_key("parent", parent)?;
        }
        let idmap = IdMapping::from_labels(&labels)?;
        let limit = match labels.get(MAX_SIZE_LABEL) {
            Some(v) => Some(parse_size_label(v)?),
            None => None,
        };
        let _guard = self.locks.lock(&[key]);
        if self.meta.get(key)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {}",
                truncate_for_message(key)
            )));
        }
        let parent_record = self.committed_parent(parent)?;

        let id = self.allocate_id();
        let object = match self
            .backend
            .create(id, kind, parent_record.as_ref().map(|p| &p.object))
        {
            Ok(o) => o,
            Err(e) => {
                self.creating_done(id);
                return Err(object_missing(e, "parent snapshot", parent));
            }
        };
        if let Some(limit) = limit.filter(|_| kind == Kind::Active)
            && let Err(e) = self.backend.set_limit(&object, Some(limit))
        {
            if let Err(d) = self.backend.destroy(id, object.native) {
                warn!(id = %id, error = %d, "could not destroy the object of a failed create; left for cleanup");
            }
            self.creating_done(id);
            return Err(e);
        }
        let now = Timestamp::now();
        let record = Record {
            id,
            kind,
            parent: parent_record.as_ref().map(|_| parent.to_owned()),
            parent_id: parent_record.as_ref().map(|p| p.id),
            labels,
            created: now,
            updated: now,
            object,
            usage: None,
            limit: limit.filter(|_| kind == Kind::Active),
        };
        let stored =
            failpoint::hit("create.after_fs").and_then(|()| self.meta.insert(key, &record));
        if let Err(e) = stored {
            // The object has no record: destroy it now; if that fails too it
            // is an orphan for Cleanup or the next startup.
            if let Err(d) = self.backend.destroy(id, object.native) {
                warn!(id = %id, error = %d, "could not destroy the object of a failed create; left for cleanup");
            }
            self.creating_done(id);
            if let Some(p) = &parent_record {
                self.destroy_if_removed(p);
            }
            return Err(e);
        }
        self.creating_done(id);
        failpoint::hit("create.after_meta")?;
        debug!(key = %truncate_for_message(key), id = %id, %kind, "created");
        self.mounts_of(&record.object, kind, idmap.as_ref())
    }

    /// The backend's mounts of an object, with the id mapping applied.
    fn mounts_of(
        &self,
        obj: &crate::meta::ObjectRef,
        kind: Kind,
        idmap: Option<&IdMapping>,
    ) -> Result<Vec<Mount>> {
        let mut mounts = self.backend.mounts(obj, kind)?;
        if let Some(m) = idmap {
            // Views are read-only objects on every backend.
            m.apply(&mut mounts, kind == Kind::View);
        }
        Ok(mounts)
    }

    /// The record of `parent` ("" for none), which must be committed.
    fn committed_parent(&self, parent: &str) -> Result<Option<Record>> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = self.meta.get(parent)?.ok_or_else(|| {
            Error::NotFound(format!("parent snapshot {}", truncate_for_message(parent)))
        })?;
        if p.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {} is not a committed snapshot",
                truncate_for_message(parent)
            )));
        }
        Ok(Some(p))
    }

    /// Records, as the committed snapshot `name` on `parent` ("" for none)
    /// with `labels`, an object that a native receive (`btrfs receive`)
    /// made at `staged` (see [`Backend::adopt`]): how import turns a
    /// filesystem stream into a snapshot without copying it again.
    ///
    /// Crash safety: the backend moves the object into the committed area
    /// before one metadata transaction records it, so a crash in between
    /// leaves an orphan that startup repair destroys. Until then the staged
    /// object is the caller's to clean up.
    pub fn adopt_committed(
        &self,
        name: &str,
        parent: &str,
        labels: Labels,
        staged: &str,
    ) -> Result<()> {
        validate_key("name", name)?;
        let labels = normalize_labels(labels);
        validate_labels(&labels)?;
        let _guard = self.locks.lock(&[name]);
        if self.meta.get(name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {}",
                truncate_for_message(name)
            )));
        }
        let parent_record = self.committed_parent(parent)?;
        let id = self.allocate_id();
        let adopted = self
            .backend
            .adopt(id, staged, parent_record.as_ref().map(|p| &p.object));
        let (object, usage) = match adopted {
            Ok(v) => v,
            Err(e) => {
                // A failure after the move leaves the object in the
                // committed area: destroy it (else Cleanup will).
                if let Err(d) = self.backend.destroy(id, 0) {
                    warn!(id = %id, error = %d, "could not destroy the object of a failed adopt; left for cleanup");
                }
                self.creating_done(id);
                return Err(e);
            }
        };
        let now = Timestamp::now();
        let record = Record {
            id,
            kind: Kind::Committed,
            parent: parent_record.as_ref().map(|_| parent.to_owned()),
            parent_id: parent_record.as_ref().map(|p| p.id),
            labels,
            created: now,
            updated: now,
            object,
            usage: Some(usage),
            limit: None,
        };
        if let Err(e) = self.meta.insert(name, &record) {
            if let Err(d) = self.backend.destroy(id, object.native) {
                warn!(id = %id, error = %d, "could not destroy the object of a failed adopt; left for cleanup");
            }
            self.creating_done(id);
            return Err(e);
        }
        self.creating_done(id);
        debug!(name = %truncate_for_message(name), id = %id, "adopted a received object as committed");
        Ok(())
    }

    /// Commits the active snapshot `key` as `name`, with `labels`.
    ///
    /// `rebase_parent` is containerd 2.2's `CommitSnapshotRequest.parent`:
    /// committing onto a different parent is not supported (cowsnap does
    /// not advertise the "rebase" capability); naming the snapshot's own
    /// parent, or none, is accepted.
    pub fn commit(&self, name: &str, key: &str, labels: Labels, rebase_parent: &str) -> Result<()> {
        validate_key("name", name)?;
        validate_key("key", key)?;
        let labels = normalize_labels(labels);
        validate_labels(&labels)?;
        let _guard = self.locks.lock(&[key, name]);
        if self.meta.get(name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {}",
                truncate_for_message(name)
            )));
        }
        let record = self.meta.get(key)?.ok_or_else(|| {
            Error::NotFound(format!("active snapshot {}", truncate_for_message(key)))
        })?;
        if record.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {} is a {} snapshot, not active: only active snapshots can be committed",
                truncate_for_message(key),
                record.kind
            )));
        }
        if !rebase_parent.is_empty() && record.parent.as_deref() != Some(rebase_parent) {
            return Err(Error::Unimplemented(format!(
                "commit of {} onto a different parent {} (rebase) is not supported by cowsnap",
                truncate_for_message(key),
                truncate_for_message(rebase_parent)
            )));
        }

        let usage = self
            .backend
            .commit(&record.object)
            .map_err(|e| object_missing(e, "snapshot", key))?;
        let now = Timestamp::now();
        let stored = failpoint::hit("commit.after_fs").and_then(|()| {
            self.meta.commit(key, name, record.id, |r| {
                r.kind = Kind::Committed;
                r.labels = labels;
                r.created = now;
                r.updated = now;
                r.usage = Some(usage);
            })
        });
        if let Err(e) = stored {
            // Undo the filesystem step so the snapshot stays active.
            let found = FoundObject {
                id: record.id,
                area: Kind::Committed,
                readonly: true,
                native: record.object.native,
            };
            if let Err(u) = self.backend.reconcile(&found, Kind::Active) {
                error!(id = %record.id, error = %u, "could not undo a failed commit; startup repair will");
            }
            return Err(e);
        }
        failpoint::hit("commit.after_meta")?;
        debug!(key = %truncate_for_message(key), name = %truncate_for_message(name), id = %record.id, "committed");
        Ok(())
    }

    /// After a create whose metadata step failed: if `parent` was removed
    /// meanwhile, destroys its object, which the clone of the failed create
    /// may have kept alive (ZFS refuses to destroy a dataset whose snapshot
    /// has clones, so the Remove that won the race left it for Cleanup). An
    /// object without a record is an orphan, and its id is never reused; a
    /// clone of another create still blocks it, and that create (or Cleanup)
    /// comes back here. Already gone (btrfs, or no clone): a no-op.
    fn destroy_if_removed(&self, parent: &Record) {
        match self.meta.key_of(parent.id) {
            Ok(None) => {
                if let Err(e) = self.backend.destroy(parent.id, parent.object.native) {
                    debug!(id = %parent.id, error = %e, "removed parent's object still busy; left for cleanup");
                }
            }
            Ok(Some(_)) => {}
            Err(e) => debug!(id = %parent.id, error = %e, "could not look up the parent's record"),
        }
    }

    /// Removes snapshot `key`. Fails with FailedPrecondition when it has
    /// children. Once the record is gone the call succeeds even if the
    /// object cannot be destroyed now (Cleanup retries), so containerd's
    /// garbage collector is never stuck on one snapshot. Where the backend
    /// allows it, the object is destroyed after the reply, by a background
    /// worker (see [`DestroyQueue`]).
    pub fn remove(&self, key: &str) -> Result<()> {
        validate_key("key", key)?;
        let _guard = self.locks.lock(&[key]);
        let record = self
            .meta
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {}", truncate_for_message(key))))?;
        if self.meta.has_children(record.id)? {
            return Err(remove_with_children(key));
        }
        // From before the record goes until the object is destroyed or
        // queued, the object is in flight, not an orphan (check, Cleanup).
        let _in_flight = InFlight::mark(self, record.id);
        self.meta.remove(key, record.id)?;
        failpoint::hit("remove.after_meta")?;
        if let Some(queue) = &self.destroys {
            // The record is gone durably: the object is an orphan nobody
            // refers to, and its destruction need not hold up the reply.
            queue.push(record.id, record.object.native);
            debug!(key = %truncate_for_message(key), id = %record.id, "removed; object queued for destruction");
            return Ok(());
        }
        if let Err(e) = self.backend.destroy(record.id, record.object.native) {
            warn!(
                key = %truncate_for_message(key),
                id = %record.id,
                error = %e,
                "snapshot removed from metadata; its object could not be destroyed now and is left for Cleanup"
            );
        }
        failpoint::hit("remove.after_fs")?;
        debug!(key = %truncate_for_message(key), id = %record.id, "removed");
        Ok(())
    }

    /// Information about `key`.
    pub fn stat(&self, key: &str) -> Result<Info> {
        validate_key("key", key)?;
        let record = self
            .meta
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {}", truncate_for_message(key))))?;
        Ok(record.info(key))
    }

    /// The mounts of the active snapshot or view `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        validate_key("key", key)?;
        let record = self
            .meta
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {}", truncate_for_message(key))))?;
        if record.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {} is committed: only active snapshots and views have mounts",
                truncate_for_message(key)
            )));
        }
        if !self.backend.exists(&record.object, record.kind)? {
            return Err(object_missing(
                Error::io("mounts", std::io::Error::from(std::io::ErrorKind::NotFound)),
                "snapshot",
                key,
            ));
        }
        // The labels were validated when the snapshot was created.
        let idmap = IdMapping::from_labels(&record.labels).ok().flatten();
        self.mounts_of(&record.object, record.kind, idmap.as_ref())
    }

    /// Updates the mutable fields (labels) of `info.name`, as containerd
    /// does: no field paths replace all labels; `labels` replaces all;
    /// `labels.<k>` sets or deletes one label; any other path is
    /// InvalidArgument.
    pub fn update(&self, info: &Info, field_paths: &[String]) -> Result<Info> {
        validate_key("key", &info.name)?;
        for path in field_paths {
            if path != "labels" && !path.starts_with("labels.") {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {} field on snapshot {}: only labels are mutable",
                    truncate_for_message(path),
                    truncate_for_message(&info.name)
                )));
            }
        }
        let record = self.meta.update(&info.name, |r| {
            let mut labels = r.labels.clone();
            if field_paths.is_empty() {
                labels = info.labels.clone();
            }
            for path in field_paths {
                if path == "labels" {
                    labels = info.labels.clone();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => {
                            labels.insert(k.to_owned(), v.clone());
                        }
                        None => {
                            labels.remove(k);
                        }
                    }
                }
            }
            let labels = normalize_labels(labels);
            validate_labels(&labels)?;
            r.labels = labels;
            r.updated = Timestamp::now();
            Ok(())
        })?;
        Ok(record.info(&info.name))
    }

    /// Every snapshot matching `filters` (containerd filter syntax; several
    /// filters are OR-ed), in key order. Reads one consistent view of the
    /// metadata and returns with no transaction or lock held, so callers
    /// may stream the result and call back into the snapshotter.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter =
            FilterSet::parse(filters).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut out = Vec::new();
        for (key, record) in self.meta.all()? {
            let parent = record.parent.as_deref().unwrap_or("");
            let fields = SnapshotFields {
                name: &key,
                parent,
                kind: record.kind.as_str(),
                labels: &record.labels,
            };
            if filter.is_always() || filter.matches(&fields) {
                out.push(record.info(&key));
            }
        }
        Ok(out)
    }

    /// Disk usage of `key`: measured now for active snapshots and views,
    /// stored at commit for committed ones (see docs/design.md).
    pub fn usage(&self, key: &str) -> Result<Usage> {
        validate_key("key", key)?;
        // An active snapshot is measured through its object's path: without
        // the key's lock a concurrent Commit (which moves the object) or
        // Remove (which destroys it) turns the measure into ENOENT, answered
        // as Internal. Measuring takes microseconds.
        let _guard = self.locks.lock(&[key]);
        let record = self
            .meta
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {}", truncate_for_message(key))))?;
        match record.kind {
            Kind::Committed => Ok(record.usage.unwrap_or_default()),
            kind => self
                .backend
                .usage(&record.object, kind)
                .map_err(|e| object_missing(e, "snapshot", key)),
        }
    }

    /// Destroys filesystem objects that no record owns (left by a crash, or
    /// by a Remove whose destroy failed) and the backend's stale accounting.
    /// Safe while other operations run.
    pub fn cleanup(&self) -> Result<RepairReport> {
        // What Removes queued before this call is destroyed by the queue.
        if let Some(queue) = &self.destroys {
            queue.drain();
        }
        // Order matters: list the filesystem first, then take the set of
        // objects being created (or destroyed by the queue), then read the
        // records. An object that exists in the listing either was still
        // being created when the set was taken (skipped) or has its record
        // committed before the read.
        let found = self.backend.scan()?;
        let busy = self.busy_ids();
        let recorded: HashSet<SnapshotId> = self.meta.all_ids()?.into_iter().collect();
        let mut report = RepairReport::default();
        let mut live = Vec::with_capacity(found.len());
        for f in found {
            if recorded.contains(&f.id) || busy.contains(&f.id) {
                live.push(f);
                continue;
            }
            let held = crate::meta::ObjectRef {
                id: f.id,
                native: f.native,
                inode_base: 0,
                tree_base: None,
            };
            let bytes = self.backend.space(&held).map(|s| s.exclusive).unwrap_or(0);
            match self.backend.destroy(f.id, f.native) {
                Ok(()) => {
                    info!(id = %f.id, area = %f.area, bytes, "cleanup: destroyed orphan object");
                    report.orphans_destroyed += 1;
                    report.reclaimed_bytes += bytes;
                }
                Err(e) => {
                    warn!(id = %f.id, area = %f.area, error = %e, "cleanup: could not destroy orphan object");
                    report.orphans_failed += 1;
                    live.push(f);
                }
            }
        }
        report.stale_accounting_removed = self.backend.cleanup(&live)?.stale_accounting_removed;
        crate::metrics::observe_cleanup(&report);
        Ok(report)
    }

    /// Startup repair: reconciles metadata and filesystem after a crash.
    fn repair(&self) -> Result<RepairReport> {
        let found = self.backend.scan()?;
        let records = self.meta.all()?;
        let mut report = RepairReport::default();
        let max_found = found.iter().map(|f| f.id.0).max().unwrap_or(0);
        let mut by_id: HashMap<SnapshotId, FoundObject> = HashMap::with_capacity(found.len());
        for f in found {
            if let Some(dup) = by_id.insert(f.id, f) {
                return Err(Error::Unavailable(format!(
                    "damaged state: snapshot id {} has objects in both the {} and {} areas; resolve by hand",
                    f.id, dup.area, f.area
                )));
            }
        }
        let mut drop_keys = Vec::new();
        for (key, record) in &records {
            match by_id.remove(&record.id) {
                Some(f) => {
                    let want_readonly = record.kind != Kind::Active;
                    if f.area != record.kind || f.readonly != want_readonly {
                        info!(
                            key = %truncate_for_message(key), id = %record.id,
                            found_area = %f.area, found_readonly = f.readonly, kind = %record.kind,
                            "repair: moving object to the state its record says (interrupted commit)"
                        );
                        self.backend.reconcile(&f, record.kind)?;
                        report.objects_reconciled += 1;
                    }
                }
                None if record.kind == Kind::Committed => {
                    error!(
                        key = %truncate_for_message(key), id = %record.id,
                        "repair: committed snapshot has lost its filesystem object (deleted outside cowsnap?); \
                         keeping the record, remove the snapshot to drop it"
                    );
                    report.committed_missing.push(key.clone());
                }
                None => {
                    warn!(
                        key = %truncate_for_message(key), id = %record.id, kind = %record.kind,
                        "repair: dropping record whose object is missing"
                    );
                    drop_keys.push(key.clone());
                }
            }
        }
        for f in by_id.into_values() {
            match self.backend.destroy(f.id, f.native) {
                Ok(()) => {
                    info!(id = %f.id, area = %f.area, "repair: destroyed orphan object");
                    report.orphans_destroyed += 1;
                }
                Err(e) => {
                    warn!(id = %f.id, area = %f.area, error = %e, "repair: could not destroy orphan object");
                    report.orphans_failed += 1;
                }
            }
        }
        let next = self.next_id.load(Ordering::SeqCst).max(max_found + 1);
        self.meta.repair(&drop_keys, next)?;
        self.next_id.store(next, Ordering::SeqCst);
        report.records_dropped = drop_keys;
        crate::metrics::observe_repair(&report);
        Ok(report)
    }

    fn allocate_id(&self) -> SnapshotId {
        let id = SnapshotId(self.next_id.fetch_add(1, Ordering::SeqCst));
        self.creating_set().insert(id);
        id
    }

    fn creating_done(&self, id: SnapshotId) {
        self.creating_set().remove(&id);
    }

    /// Ids whose object has no record because it is being created, being
    /// destroyed by a Remove in flight, or waiting in the destroy queue: not
    /// orphans.
    pub(crate) fn busy_ids(&self) -> HashSet<SnapshotId> {
        let mut ids = self.creating_set().clone();
        if let Some(queue) = &self.destroys {
            ids.extend(queue.pending());
        }
        ids
    }

    /// Finishes background work: destroys the objects still queued by
    /// Removes and stops the worker (later Removes destroy before
    /// replying). Called at shutdown, once no call is in flight; what a
    /// crash leaves queued is destroyed by startup repair instead.
    pub fn shutdown(&self) {
        if let Some(queue) = &self.destroys {
            queue.shutdown();
        }
    }

    fn creating_set(&self) -> std::sync::MutexGuard<'_, HashSet<SnapshotId>> {
        // Updates are single inserts/removes: a poisoned set is consistent.
        self.creating.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A filesystem object that a record names but that is gone (deleted
/// outside cowsnap) is the snapshot's state, not an internal failure:
/// FailedPrecondition, saying what to do.
fn object_missing(e: Error, what: &str, key: &str) -> Error {
    if e.is_not_found() {
        Error::FailedPrecondition(format!(
            "{what} {}: its filesystem object is missing (deleted outside cowsnap?): {e}; \
             remove the snapshot to drop its record",
            truncate_for_message(key)
        ))
    } else {
        e
    }
}

/// Parses the value of the max-size label: bytes, optionally with a binary
/// unit ("1073741824", "512M", "10GiB").
fn parse_size_label(v: &str) -> Result<u64> {
    let size: crate::config::ByteSize = v.parse().map_err(|e| {
        Error::InvalidArgument(format!(
            "label {MAX_SIZE_LABEL}={}: not a size: {e}",
            truncate_for_message(v)
        ))
    })?;
    if size.bytes() == 0 {
        return Err(Error::InvalidArgument(format!(
            "label {MAX_SIZE_LABEL} must be more than 0"
        )));
    }
    Ok(size.bytes())
}

/// Startup repair destroys every object that has no record. With no
/// metadata at all (the file deleted, or truncated to nothing, which redb
/// silently initializes as a new empty database) that is every snapshot, so
/// refuse to start instead, before the database file is created.
fn refuse_new_metadata_over_objects(path: &Path, backend: &dyn Backend) -> Result<()> {
    let new = match std::fs::metadata(path) {
        Ok(m) => m.len() == 0,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
    };
    if !new {
        return Ok(());
    }
    let found = backend.scan()?;
    if found.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<u64> = found.iter().map(|f| f.id.0).collect();
    ids.sort_unstable();
    let shown: Vec<String> = ids.iter().take(10).map(u64::to_string).collect();
    let more = if ids.len() > 10 { ", ..." } else { "" };
    Err(Error::Unavailable(format!(
        "damaged state: the metadata {} is missing or empty, but the root holds {} snapshot \
         objects (ids {}{more}); refusing to start, as startup repair would destroy them all. \
         Restore the metadata file, or delete the objects to start afresh",
        path.display(),
        ids.len(),
        shown.join(", ")
    )))
}

/// containerd never stores a label with an empty value: setting one to ""
/// deletes it.
fn normalize_labels(mut labels: Labels) -> Labels {
    labels.retain(|_, v| !v.is_empty());
    labels
}

/// Marks an id busy (see [`Snapshotter::busy_ids`]) for as long as it lives.
struct InFlight<'a> {
    snapshotter: &'a Snapshotter,
    id: SnapshotId,
}

impl<'a> InFlight<'a> {
    fn mark(snapshotter: &'a Snapshotter, id: SnapshotId) -> Self {
        snapshotter.creating_set().insert(id);
        InFlight { snapshotter, id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.snapshotter.creating_done(self.id);
    }
}
