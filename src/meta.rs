//! Snapshot metadata in a redb database.
//!
//! The schema (also in docs/design.md):
//!
//! | table       | key                         | value                                  |
//! |-------------|-----------------------------|----------------------------------------|
//! | `snapshots` | key or name (`&str`)        | [`Record`] as JSON bytes               |
//! | `ids`       | snapshot id (`u64`)         | key or name (`&str`)                   |
//! | `children`  | (parent id, child id)       | `()`                                   |
//! | `meta`      | `"schema_version"`, `"next_id"` | `u64`                              |
//!
//! Every mutation is exactly one write transaction, and re-checks inside
//! that transaction everything it depends on (the key is free, the parent
//! exists and is committed, no children), because the core checks first
//! outside any transaction and then does slow filesystem work without
//! holding one. Records are JSON so that fields can be added with defaults
//! without a migration.
//!
//! # Group commit
//!
//! A mutation returns only once its transaction is durable, but concurrent
//! mutations share the fsync. redb runs one write transaction at a time and
//! orders all commits; a durable commit persists the whole database state,
//! every earlier commit included. So a mutation commits with
//! `Durability::None` (in memory, visible to later transactions) and then
//! waits for a *flush round*, an empty durable write transaction that
//! started after its commit ([`crate::rounds::Rounds`]); one such fsync
//! covers every mutation that committed before it. A mutation that finds no
//! other writer and no round running commits durably itself (the round is
//! its own commit), so a lone client pays one fsync per mutation, as
//! before. Waiting mutations leave the round to the writers still in
//! flight, so that the writers queued behind one fsync share the next. Why
//! this keeps the crash protocol sound is in docs/design.md ("Group commit
//! of the metadata").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Info, Kind, Labels, SnapshotId, Timestamp, Usage, truncate_for_message};
use crate::rounds::Rounds;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const IDS: TableDefinition<u64, &str> = TableDefinition::new("ids");
const CHILDREN: TableDefinition<(u64, u64), ()> = TableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const SCHEMA_VERSION: u64 = 1;
const KEY_SCHEMA_VERSION: &str = "schema_version";
const KEY_NEXT_ID: &str = "next_id";

/// The backend's handle on a snapshot's filesystem object, stored with the
/// record. Only the backend interprets `native`, `inode_base` and
/// `tree_base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// The snapshot id, which names the object on disk.
    pub id: SnapshotId,
    /// The backend's own id of the object (btrfs: subvolume id).
    pub native: u64,
    /// Inode number high-water mark inherited from the parent, so inode
    /// usage can be reported "excluding the parent" (btrfs).
    #[serde(default)]
    pub inode_base: u64,
    /// Size of the object's own metadata tree when it was created (btrfs:
    /// the root item's `bytes_used`), so Usage can leave out what the tree
    /// grew by and count file data. None in records written before it
    /// existed: their Usage counts metadata too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_base: Option<u64>,
}

/// One snapshot's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// cowsnap's id of the snapshot.
    pub id: SnapshotId,
    /// Active, view or committed.
    pub kind: Kind,
    /// The parent's name, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// The parent's id, if any.
    #[serde(default)]
    pub parent_id: Option<SnapshotId>,
    /// Labels.
    #[serde(default)]
    pub labels: Labels,
    /// Creation (or commit) time.
    pub created: Timestamp,
    /// Last update time.
    pub updated: Timestamp,
    /// The filesystem object.
    pub object: ObjectRef,
    /// Usage measured when the snapshot was committed.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Size limit in bytes, if any (label `containerd.io/snapshot/max-size`
    /// or `cowsnap quota set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

impl Record {
    /// The containerd view of this record under `name`.
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone().unwrap_or_default(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: self.created,
            updated: self.updated,
        }
    }

    fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self)
            .map_err(|e| Error::Internal(format!("encoding record {}: {e}", self.id)))
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::Internal(format!(
                "metadata record of {} is damaged: {e}",
                truncate_for_message(key)
            ))
        })
    }
}

/// The metadata database.
pub struct MetaStore {
    /// `None` only while being reopened.
    db: RwLock<Option<Database>>,
    /// Set when redb reported an I/O error: redb then refuses every later
    /// call ("previous I/O error") until the database is reopened, which
    /// the next call does (e.g. once a full disk has room again).
    needs_reopen: AtomicBool,
    /// Counts reopens. A commit is durable only through a flush round on
    /// the same database handle: a reopen discards what was not flushed.
    generation: AtomicU64,
    /// Flush rounds (durable commits) shared by concurrent mutations; a
    /// round's value is the generation it flushed.
    flushes: Rounds<u64, FlushFailure>,
    /// Mutations between their start and their commit: with more than one,
    /// commits are left to a shared flush round.
    writers: AtomicUsize,
    path: PathBuf,
}

/// A failed flush round, as remembered for every mutation it covered.
#[derive(Debug, Clone)]
struct FlushFailure {
    context: String,
    /// The I/O error, if it was one (kept so that a full disk still answers
    /// ResourceExhausted).
    io: Option<(std::io::ErrorKind, Option<i32>)>,
    message: String,
}

impl FlushFailure {
    fn new(e: &Error) -> Self {
        let (context, io) = match e {
            Error::Metadata { context, source } => (
                context.clone(),
                match source.as_ref() {
                    redb::Error::Io(io) => Some((io.kind(), io.raw_os_error())),
                    _ => None,
                },
            ),
            _ => (String::new(), None),
        };
        FlushFailure {
            context,
            io,
            message: e.to_string(),
        }
    }

    fn into_error(self) -> Error {
        match self.io {
            Some((kind, errno)) => Error::meta(
                self.context,
                redb::Error::Io(match errno {
                    Some(errno) => std::io::Error::from_raw_os_error(errno),
                    None => std::io::Error::from(kind),
                }),
            ),
            None => Error::Internal(self.message),
        }
    }
}

/// Counts a mutation in [`MetaStore::writers`] until its commit is done
/// (or failed).
struct Writing<'a>(&'a MetaStore);

impl<'a> Writing<'a> {
    fn enter(store: &'a MetaStore) -> Self {
        store.writers.fetch_add(1, Ordering::SeqCst);
        Writing(store)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.0.writers.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last writer in flight is gone: a waiting mutation may now
            // have to run the round itself.
            self.0.flushes.nudge();
        }
    }
}

impl MetaStore {
    /// Opens (creating if needed) the database at `path` and checks its
    /// schema version.
    pub fn open(path: &Path) -> Result<Self> {
        let store = MetaStore {
            db: RwLock::new(Some(open_checked(path)?)),
            needs_reopen: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            flushes: Rounds::default(),
            writers: AtomicUsize::new(0),
            path: path.to_owned(),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// Runs `f` on the database, reopening it first if an earlier call hit
    /// an I/O error, and noting an I/O error `f` hits.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        if self.needs_reopen.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or_else(|| {
            Error::Unavailable(format!(
                "metadata {} is being reopened",
                self.path.display()
            ))
        })?;
        let out = f(db);
        if let Err(Error::Metadata { source, .. }) = &out
            && matches!(
                source.as_ref(),
                redb::Error::Io(_) | redb::Error::PreviousIo
            )
        {
            self.needs_reopen.store(true, Ordering::SeqCst);
        }
        out
    }

    fn reopen(&self) -> Result<()> {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.needs_reopen.load(Ordering::SeqCst) {
            return Ok(()); // another caller reopened it meanwhile
        }
        // redb locks the file: the old handle must be closed first.
        drop(guard.take());
        let db = Database::create(&self.path).map_err(|e| {
            Error::meta(
                format!("reopening {} after an I/O error", self.path.display()),
                e,
            )
        })?;
        *guard = Some(db);
        // Commits not flushed before the reopen are gone (or were flushed by
        // the failed round after all): no later round may vouch for them.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.needs_reopen.store(false, Ordering::SeqCst);
        tracing::info!(path = %self.path.display(), "metadata reopened after an I/O error");
        Ok(())
    }

    /// Runs one mutation: `change` in a write transaction, committed and
    /// durable when this returns Ok (see "Group commit" above). An error
    /// from `change` aborts the transaction. An error after the commit (a
    /// failed flush round) leaves the outcome unknown, as a failed durable
    /// commit does: the change may or may not survive the reopen that
    /// follows.
    fn mutate<T>(
        &self,
        what: &str,
        change: impl FnOnce(&WriteTransaction) -> Result<T>,
    ) -> Result<T> {
        let writing = Writing::enter(self);
        let (out, ticket, generation, flushed) = self.with_db(|db| {
            let mut txn = db
                .begin_write()
                .map_err(|e| Error::meta("begin write", e))?;
            let out = change(&txn)?;
            let generation = self.generation.load(Ordering::SeqCst);
            // Taken while this transaction holds redb's write lock: a round
            // that counts this ticket begins its own transaction after this
            // one committed, so it makes this one durable too.
            let ticket = self.flushes.ticket();
            if self.writers.load(Ordering::SeqCst) == 1 {
                // Alone: commit durably, as the round covering every ticket
                // so far (this one included), unless a round is running.
                let mut pending = Some(txn);
                let led = self.flushes.lead_if_idle(|| {
                    let txn = pending.take().ok_or_else(|| {
                        FlushFailure::new(&Error::Internal("transaction committed twice".into()))
                    })?;
                    txn.commit()
                        .map(|()| generation)
                        .map_err(|e| self.round_failed(Error::meta(format!("commit {what}"), e)))
                });
                match (led, pending) {
                    (Some(result), _) => return Ok((out, ticket, generation, Some(result))),
                    (None, Some(t)) => txn = t,
                    (None, None) => {
                        return Err(Error::Internal("transaction lost by the flush".into()));
                    }
                }
            }
            txn.set_durability(Durability::None)
                .map_err(|e| Error::meta(format!("set durability of {what}"), e))?;
            txn.commit()
                .map_err(|e| Error::meta(format!("commit {what}"), e))?;
            Ok((out, ticket, generation, None))
        })?;
        drop(writing);
        let flushed = match flushed {
            Some(result) => result,
            // A writer still in flight commits after this one: its durable
            // commit, or the round it waits for, covers this one too. Leave
            // the round to the last writer, so that writers queued behind
            // one fsync share the next.
            None => self.flushes.wait_for_leader(
                ticket,
                || self.writers.load(Ordering::SeqCst) == 0,
                || self.flush_round(),
            ),
        };
        let flushed = flushed.map_err(FlushFailure::into_error)?;
        if flushed != generation {
            return Err(Error::Unavailable(format!(
                "metadata {} was reopened after an I/O error before this {what} was made durable; \
                 it may be lost",
                self.path.display()
            )));
        }
        Ok(out)
    }

    /// A flush round: an empty durable write transaction, which persists
    /// every commit before it. Returns the generation it flushed.
    fn flush_round(&self) -> Result<u64, FlushFailure> {
        self.with_db(|db| {
            let generation = self.generation.load(Ordering::SeqCst);
            let txn = db
                .begin_write()
                .map_err(|e| Error::meta("begin flush", e))?;
            txn.commit().map_err(|e| Error::meta("flush", e))?;
            Ok(generation)
        })
        .map_err(|e| self.round_failed(e))
    }

    /// Notes a failed flush round. The database is reopened before the next
    /// call whatever the error was: the commits the round covered answer an
    /// error, and must not be flushed later by a round that succeeds.
    fn round_failed(&self, e: Error) -> FlushFailure {
        self.needs_reopen.store(true, Ordering::SeqCst);
        tracing::warn!(path = %self.path.display(), error = %e, "metadata flush failed; reopening the database");
        FlushFailure::new(&e)
    }

    /// Flush rounds run so far (each one fsync of the database).
    pub fn flush_rounds(&self) -> u64 {
        self.flushes.rounds()
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init_schema(&self) -> Result<()> {
        self.with_db(|db| {
        let txn = db.begin_write().map_err(|e| Error::meta("begin", e))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| Error::meta("open meta", e))?;
            let found = meta
                .get(KEY_SCHEMA_VERSION)
                .map_err(|e| Error::meta("read schema version", e))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert(KEY_SCHEMA_VERSION, SCHEMA_VERSION)
                        .map_err(|e| Error::meta("write schema version", e))?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(Error::Unavailable(format!(
                        "metadata {} has schema version {v}; this cowsnap reads version {SCHEMA_VERSION}",
                        self.path.display()
                    )));
                }
            }
            txn.open_table(SNAPSHOTS)
                .map_err(|e| Error::meta("open snapshots", e))?;
            txn.open_table(IDS)
                .map_err(|e| Error::meta("open ids", e))?;
            txn.open_table(CHILDREN)
                .map_err(|e| Error::meta("open children", e))?;
        }
        txn.commit().map_err(|e| Error::meta("commit schema", e))
        })
    }

    /// The record stored under `key`.
    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| Error::meta("begin read", e))?;
            let t = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| Error::meta("open snapshots", e))?;
            match t.get(key).map_err(|e| Error::meta("read snapshot", e))? {
                Some(v) => Ok(Some(Record::decode(key, v.value())?)),
                None => Ok(None),
            }
        })
    }

    /// The key currently naming snapshot `id`.
    pub fn key_of(&self, id: SnapshotId) -> Result<Option<String>> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| Error::meta("begin read", e))?;
            let t = txn
                .open_table(IDS)
                .map_err(|e| Error::meta("open ids", e))?;
            Ok(t.get(id.0)
                .map_err(|e| Error::meta("read id", e))?
                .map(|v| v.value().to_owned()))
        })
    }

    /// The smallest id never handed out, as recorded.
    pub fn next_id(&self) -> Result<u64> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| Error::meta("begin read", e))?;
            let t = txn
                .open_table(META)
                .map_err(|e| Error::meta("open meta", e))?;
            Ok(t.get(KEY_NEXT_ID)
                .map_err(|e| Error::meta("read next id", e))?
                .map(|v| v.value())
                .unwrap_or(1))
        })
    }

    /// Every record, in key order. Reads one consistent snapshot of the
    /// database and holds no transaction once it returns.
    pub fn all(&self) -> Result<Vec<(String, Record)>> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| Error::meta("begin read", e))?;
            let t = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| Error::meta("open snapshots", e))?;
            let mut out = Vec::with_capacity(t.len().unwrap_or(0) as usize);
            for entry in t.iter().map_err(|e| Error::meta("iterate snapshots", e))? {
                let (k, v) = entry.map_err(|e| Error::meta("iterate snapshots", e))?;
                out.push((k.value().to_owned(), Record::decode(k.value(), v.value())?));
            }
            Ok(out)
        })
    }

    /// Every id that has a record.
    pub fn all_ids(&self) -> Result<Vec<SnapshotId>> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| Error::meta("begin read", e))?;
            let t = txn
                .open_table(IDS)
                .map_err(|e| Error::meta("open ids", e))?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(|e| Error::meta("iterate ids", e))? {
                let (k, _) = entry.map_err(|e| Error::meta("iterate ids", e))?;
                out.push(SnapshotId(k.value()));
            }
            Ok(out)
        })
    }

    /// Number of children of every snapshot that has some.
    pub fn children_counts(&self) -> Result<HashMap<SnapshotId, u64>> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| Error::meta("begin read", e))?;
            let t = txn
                .open_table(CHILDREN)
                .map_err(|e| Error::meta("open children", e))?;
            let mut out: HashMap<SnapshotId, u64> = HashMap::new();
            for entry in t.iter().map_err(|e| Error::meta("iterate children", e))? {
                let (k, _) = entry.map_err(|e| Error::meta("iterate children", e))?;
                *out.entry(SnapshotId(k.value().0)).or_default() += 1;
            }
            Ok(out)
        })
    }

    /// Whether snapshot `id` has children.
    pub fn has_children(&self, id: SnapshotId) -> Result<bool> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| Error::meta("begin read", e))?;
            let t = txn
                .open_table(CHILDREN)
                .map_err(|e| Error::meta("open children", e))?;
            let mut r = t
                .range((id.0, 0)..=(id.0, u64::MAX))
                .map_err(|e| Error::meta("read children", e))?;
            Ok(r.next().is_some())
        })
    }

    /// Records a new active snapshot or view under `key`. Fails with
    /// AlreadyExists when the key is taken and NotFound/FailedPrecondition
    /// when the parent vanished or is not committed.
    pub fn insert(&self, key: &str, record: &Record) -> Result<()> {
        self.mutate("insert", |txn| {
            {
                let mut snaps = txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| Error::meta("open snapshots", e))?;
                if snaps
                    .get(key)
                    .map_err(|e| Error::meta("read snapshot", e))?
                    .is_some()
                {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {}",
                        truncate_for_message(key)
                    )));
                }
                if let Some(parent) = &record.parent {
                    let p = snaps
                        .get(parent.as_str())
                        .map_err(|e| Error::meta("read parent", e))?
                        .map(|v| Record::decode(parent, v.value()))
                        .transpose()?;
                    match p {
                        None => {
                            return Err(Error::NotFound(format!(
                                "parent snapshot {}",
                                truncate_for_message(parent)
                            )));
                        }
                        Some(p) if Some(p.id) != record.parent_id || p.kind != Kind::Committed => {
                            return Err(Error::FailedPrecondition(format!(
                                "parent snapshot {} changed while the snapshot was created",
                                truncate_for_message(parent)
                            )));
                        }
                        Some(_) => {}
                    }
                }
                snaps
                    .insert(key, record.encode()?.as_slice())
                    .map_err(|e| Error::meta("insert snapshot", e))?;
                let mut ids = txn
                    .open_table(IDS)
                    .map_err(|e| Error::meta("open ids", e))?;
                ids.insert(record.id.0, key)
                    .map_err(|e| Error::meta("insert id", e))?;
                if let Some(pid) = record.parent_id {
                    let mut children = txn
                        .open_table(CHILDREN)
                        .map_err(|e| Error::meta("open children", e))?;
                    children
                        .insert((pid.0, record.id.0), ())
                        .map_err(|e| Error::meta("insert child", e))?;
                }
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| Error::meta("open meta", e))?;
                let next = meta
                    .get(KEY_NEXT_ID)
                    .map_err(|e| Error::meta("read next id", e))?
                    .map(|v| v.value())
                    .unwrap_or(1);
                if record.id.0 >= next {
                    meta.insert(KEY_NEXT_ID, record.id.0 + 1)
                        .map_err(|e| Error::meta("write next id", e))?;
                }
            }
            Ok(())
        })
    }

    /// Moves the active snapshot `key` (which must still be snapshot
    /// `expect_id`) to the committed snapshot `name`, with `update` applied
    /// to its record.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        expect_id: SnapshotId,
        update: impl FnOnce(&mut Record),
    ) -> Result<Record> {
        self.mutate("commit", |txn| {
            let record = {
                let mut snaps = txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| Error::meta("open snapshots", e))?;
                let mut record = existing(&snaps, key)?;
                if record.id != expect_id || record.kind != Kind::Active {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {} changed while it was committed",
                        truncate_for_message(key)
                    )));
                }
                if snaps
                    .get(name)
                    .map_err(|e| Error::meta("read snapshot", e))?
                    .is_some()
                {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {}",
                        truncate_for_message(name)
                    )));
                }
                update(&mut record);
                snaps
                    .remove(key)
                    .map_err(|e| Error::meta("remove active", e))?;
                snaps
                    .insert(name, record.encode()?.as_slice())
                    .map_err(|e| Error::meta("insert committed", e))?;
                let mut ids = txn
                    .open_table(IDS)
                    .map_err(|e| Error::meta("open ids", e))?;
                ids.insert(record.id.0, name)
                    .map_err(|e| Error::meta("update id", e))?;
                record
            };
            Ok(record)
        })
    }

    /// Drops the record of `key` (which must still be snapshot `expect_id`).
    /// Fails with FailedPrecondition when it has children.
    pub fn remove(&self, key: &str, expect_id: SnapshotId) -> Result<Record> {
        self.mutate("remove", |txn| {
            let record = {
                let mut snaps = txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| Error::meta("open snapshots", e))?;
                let record = existing(&snaps, key)?;
                if record.id != expect_id {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {} changed while it was removed",
                        truncate_for_message(key)
                    )));
                }
                let mut children = txn
                    .open_table(CHILDREN)
                    .map_err(|e| Error::meta("open children", e))?;
                let has_children = children
                    .range((record.id.0, 0)..=(record.id.0, u64::MAX))
                    .map_err(|e| Error::meta("read children", e))?
                    .next()
                    .is_some();
                if has_children {
                    return Err(remove_with_children(key));
                }
                snaps
                    .remove(key)
                    .map_err(|e| Error::meta("remove snapshot", e))?;
                let mut ids = txn
                    .open_table(IDS)
                    .map_err(|e| Error::meta("open ids", e))?;
                ids.remove(record.id.0)
                    .map_err(|e| Error::meta("remove id", e))?;
                if let Some(pid) = record.parent_id {
                    children
                        .remove((pid.0, record.id.0))
                        .map_err(|e| Error::meta("remove child", e))?;
                }
                record
            };
            Ok(record)
        })
    }

    /// Applies `change` to the record of `key` in one transaction.
    pub fn update(
        &self,
        key: &str,
        change: impl FnOnce(&mut Record) -> Result<()>,
    ) -> Result<Record> {
        self.mutate("update", |txn| {
            let record = {
                let mut snaps = txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| Error::meta("open snapshots", e))?;
                let mut record = existing(&snaps, key)?;
                change(&mut record)?;
                snaps
                    .insert(key, record.encode()?.as_slice())
                    .map_err(|e| Error::meta("update snapshot", e))?;
                record
            };
            Ok(record)
        })
    }

    /// Drops records found to have lost their filesystem object, and raises
    /// the id high-water mark, in one transaction (startup repair).
    pub fn repair(&self, drop_keys: &[String], next_id_at_least: u64) -> Result<()> {
        self.with_db(|db| {
            let txn = db
                .begin_write()
                .map_err(|e| Error::meta("begin write", e))?;
            {
                let mut snaps = txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| Error::meta("open snapshots", e))?;
                let mut ids = txn
                    .open_table(IDS)
                    .map_err(|e| Error::meta("open ids", e))?;
                let mut children = txn
                    .open_table(CHILDREN)
                    .map_err(|e| Error::meta("open children", e))?;
                for key in drop_keys {
                    let removed = snaps
                        .remove(key.as_str())
                        .map_err(|e| Error::meta("remove snapshot", e))?
                        .map(|v| Record::decode(key, v.value()))
                        .transpose()?;
                    if let Some(r) = removed {
                        ids.remove(r.id.0)
                            .map_err(|e| Error::meta("remove id", e))?;
                        if let Some(pid) = r.parent_id {
                            children
                                .remove((pid.0, r.id.0))
                                .map_err(|e| Error::meta("remove child", e))?;
                        }
                    }
                }
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| Error::meta("open meta", e))?;
                let next = meta
                    .get(KEY_NEXT_ID)
                    .map_err(|e| Error::meta("read next id", e))?
                    .map(|v| v.value())
                    .unwrap_or(1);
                if next_id_at_least > next {
                    meta.insert(KEY_NEXT_ID, next_id_at_least)
                        .map_err(|e| Error::meta("write next id", e))?;
                }
            }
            txn.commit().map_err(|e| Error::meta("commit repair", e))
        })
    }
}

/// Opens the database, turning a damaged file into a clear refusal: redb
/// panics on some corrupt pages, and repairs others; neither may pass
/// silently, since startup repair would then take missing records for
/// orphans and destroy their data.
fn open_checked(path: &Path) -> Result<Database> {
    let damaged = |what: String| {
        Error::Unavailable(format!(
            "metadata {} is damaged ({what}); cowsnap will not start on it. Restore it from a \
             backup, or move it away to start empty (every snapshot on disk is then an orphan)",
            path.display()
        ))
    };
    create_nocow(path)?;
    let opened = std::panic::catch_unwind(|| Database::create(path));
    let mut db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(msg)))) => {
            return Err(damaged(msg));
        }
        Ok(Err(e)) => return Err(Error::meta(format!("opening {}", path.display()), e)),
        Err(_) => return Err(damaged("the database engine could not read it".into())),
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| db.check_integrity())) {
        Ok(Ok(true)) => Ok(db),
        Ok(Ok(false)) => {
            tracing::warn!(
                path = %path.display(),
                "metadata was not closed cleanly; the database engine repaired its structure \
                 (committed transactions are kept)"
            );
            Ok(db)
        }
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Err(_) => Err(damaged("its integrity check failed".into())),
    }
}

/// Creates the database file, if it does not exist yet, as a NOCOW file
/// where the filesystem has the flag (btrfs): redb never overwrites the
/// pages of its last durable commit and checksums its pages, so it needs
/// neither btrfs's copy-on-write nor its checksums, and without them each
/// fdatasync of a commit costs about a third less on btrfs (no new extents
/// to log; docs/performance.md). An existing file is left as it is (the
/// flag takes only on an empty file).
fn create_nocow(path: &Path) -> Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => {
            return Err(Error::io(
                format!("creating metadata {}", path.display()),
                e,
            ));
        }
    };
    if let Err(e) = crate::backend::btrfs::ioctl::set_nocow(file.as_fd()) {
        tracing::debug!(path = %path.display(), error = %e, "metadata file stays copy-on-write");
    }
    Ok(())
}

/// The record of `key` in a write transaction's snapshots table, or
/// NotFound.
fn existing(snaps: &redb::Table<&str, &[u8]>, key: &str) -> Result<Record> {
    match snaps
        .get(key)
        .map_err(|e| Error::meta("read snapshot", e))?
    {
        Some(v) => Record::decode(key, v.value()),
        None => Err(Error::NotFound(format!(
            "snapshot {}",
            truncate_for_message(key)
        ))),
    }
}

/// The error containerd expects when a snapshot with children is removed:
/// FailedPrecondition, with "remove" in the message.
pub fn remove_with_children(key: &str) -> Error {
    Error::FailedPrecondition(format!(
        "cannot remove snapshot {} with child snapshots",
        truncate_for_message(key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn store() -> (MetaStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "cowsnap-meta-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (MetaStore::open(&dir.join("metadata.redb")).unwrap(), dir)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn rec(id: u64, kind: Kind, parent: Option<(&str, u64)>) -> Record {
        let now = Timestamp::now();
        Record {
            id: SnapshotId(id),
            kind,
            parent: parent.map(|p| p.0.to_owned()),
            parent_id: parent.map(|p| SnapshotId(p.1)),
            labels: Labels::new(),
            created: now,
            updated: now,
            object: ObjectRef {
                id: SnapshotId(id),
                native: 256 + id,
                inode_base: 0,
                tree_base: None,
            },
            usage: None,
            limit: None,
        }
    }

    #[test]
    fn insert_twice_is_already_exists() {
        let (m, dir) = store();
        m.insert("a", &rec(1, Kind::Active, None)).unwrap();
        let e = m.insert("a", &rec(2, Kind::Active, None)).unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        assert_eq!(m.next_id().unwrap(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn insert_with_missing_parent_is_not_found() {
        let (m, dir) = store();
        let e = m
            .insert("c", &rec(2, Kind::Active, Some(("p", 1))))
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn commit_moves_record_and_keeps_id() {
        let (m, dir) = store();
        m.insert("k", &rec(1, Kind::Active, None)).unwrap();
        let r = m
            .commit("k", "n", SnapshotId(1), |r| r.kind = Kind::Committed)
            .unwrap();
        assert_eq!(r.id, SnapshotId(1));
        assert!(m.get("k").unwrap().is_none());
        assert_eq!(m.get("n").unwrap().unwrap().kind, Kind::Committed);
        assert_eq!(m.key_of(SnapshotId(1)).unwrap().as_deref(), Some("n"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn commit_onto_existing_name_is_already_exists_and_keeps_active() {
        let (m, dir) = store();
        m.insert("k", &rec(1, Kind::Active, None)).unwrap();
        m.insert("n", &rec(2, Kind::Active, None)).unwrap();
        let e = m
            .commit("k", "n", SnapshotId(1), |r| r.kind = Kind::Committed)
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        assert_eq!(m.get("k").unwrap().unwrap().kind, Kind::Active);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn remove_parent_with_children_fails_with_remove_in_message() {
        let (m, dir) = store();
        m.insert("p", &rec(1, Kind::Committed, None)).unwrap();
        m.insert("c", &rec(2, Kind::Active, Some(("p", 1))))
            .unwrap();
        assert!(m.has_children(SnapshotId(1)).unwrap());
        let e = m.remove("p", SnapshotId(1)).unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.to_string().contains("remove"));
        m.remove("c", SnapshotId(2)).unwrap();
        assert!(!m.has_children(SnapshotId(1)).unwrap());
        m.remove("p", SnapshotId(1)).unwrap();
        assert!(m.all().unwrap().is_empty());
        assert!(m.all_ids().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_survive_reopen() {
        let (m, dir) = store();
        m.insert("a", &rec(7, Kind::Active, None)).unwrap();
        drop(m);
        let m = MetaStore::open(&dir.join("metadata.redb")).unwrap();
        assert_eq!(m.get("a").unwrap().unwrap().id, SnapshotId(7));
        assert_eq!(m.next_id().unwrap(), 8);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_flush_keeps_its_code_for_every_mutation_it_covered() {
        let full = Error::meta(
            "flush",
            redb::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        );
        let shared = FlushFailure::new(&full);
        assert_eq!(shared.clone().into_error().code(), Code::ResourceExhausted);
        let other = FlushFailure::new(&Error::meta("flush", redb::Error::PreviousIo));
        assert_eq!(other.into_error().code(), Code::Internal);
    }

    #[test]
    fn a_lone_mutation_is_its_own_flush_round() {
        let (m, dir) = store();
        for i in 1..=5 {
            m.insert(&format!("k{i}"), &rec(i, Kind::Active, None))
                .unwrap();
        }
        // One durable commit each, no extra empty round.
        assert_eq!(m.flush_rounds(), 5);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_mutations_share_flush_rounds_and_all_survive_reopen() {
        let (m, dir) = store();
        let m = std::sync::Arc::new(m);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..25u64 {
                        let id = 1 + t * 100 + i;
                        let key = format!("t{t}-{i}");
                        m.insert(&key, &rec(id, Kind::Active, None)).unwrap();
                        m.update(&key, |r| {
                            r.labels.insert("n".into(), i.to_string());
                            Ok(())
                        })
                        .unwrap();
                        if i % 2 == 0 {
                            m.remove(&key, SnapshotId(id)).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mutations = 8 * (25 + 25 + 13);
        let rounds = m.flush_rounds();
        // Each round is one fsync; 8 writers always overlap somewhere.
        assert!(
            rounds < mutations,
            "{rounds} rounds for {mutations} mutations"
        );
        let m = std::sync::Arc::into_inner(m).unwrap();
        drop(m);
        let m = MetaStore::open(&dir.join("metadata.redb")).unwrap();
        let all = m.all().unwrap();
        assert_eq!(all.len(), 8 * 12);
        assert!(all.iter().all(|(_, r)| r.labels.contains_key("n")));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn repair_drops_records_and_raises_next_id() {
        let (m, dir) = store();
        m.insert("p", &rec(1, Kind::Committed, None)).unwrap();
        m.insert("c", &rec(2, Kind::Active, Some(("p", 1))))
            .unwrap();
        m.repair(&["c".to_owned()], 100).unwrap();
        assert!(m.get("c").unwrap().is_none());
        assert!(!m.has_children(SnapshotId(1)).unwrap());
        assert_eq!(m.next_id().unwrap(), 100);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
