//! The ZFS backend: one dataset per snapshot.
//!
//! Layout under the configured parent dataset `P` (names are snapshot ids
//! in decimal; a client's key never reaches ZFS):
//!
//! ```text
//! P/active/<id>               writable dataset: a clone of the parent's
//!                             origin snapshot, or a new empty dataset
//! P/view/<id>                 clone of the parent's origin snapshot, readonly=on
//! P/committed/<id>            former active dataset, readonly=on
//! P/committed/<id>@cowsnap    its origin snapshot, which children clone
//! ```
//!
//! Every dataset has `mountpoint=legacy`: ZFS never mounts them by itself,
//! and clients get `{type: zfs, source: P/active/<id>}` mounts.
//!
//! Commit renames the dataset into the committed area (a ZFS sync task: it
//! returns once the transaction group holding it, and every write made
//! before it, is on disk), reads its usage, sets `readonly=on` (another
//! sync task) and takes the origin snapshot. A committed dataset counts as
//! complete only once it has that snapshot, so a commit interrupted at any
//! step is found incomplete and undone by repair.
//!
//! Usage is the `written` property (bytes written since the origin
//! snapshot: the snapshot's own data, excluding the parent's), and the
//! object count from `zfs userspace` minus the count inherited at create.
//! No call lists datasets beyond the one it works on, except `scan` (the
//! three areas, at startup and Cleanup).

pub mod cmd;
#[doc(hidden)]
pub mod testutil;

use std::collections::{HashMap, HashSet};

use tracing::{debug, info, warn};

use self::cmd::{ZfsTool, rows};
use crate::backend::{
    AccountingState, Backend, BackendCleanup, FilesystemSpace, FoundObject, ObjectSpace,
};
use crate::error::{Error, Result};
use crate::meta::ObjectRef;
use crate::model::{Kind, Mount, SnapshotId, Usage};

/// Name of the snapshot of a committed dataset that its children clone.
pub const ORIGIN_SNAPSHOT: &str = "cowsnap";

/// User property on a committed dataset: its object count at commit, which
/// its children inherit (their `inode_base`), so creating a child needs no
/// `zfs userspace` call.
const OBJECTS_PROPERTY: &str = "cowsnap:objects";

/// Objects in a new empty dataset: its root directory.
const EMPTY_OBJECTS: u64 = 1;

const AREAS: [Kind; 3] = [Kind::Active, Kind::View, Kind::Committed];

/// The ZFS backend over a parent dataset.
pub struct ZfsBackend {
    parent: String,
    tool: ZfsTool,
}

impl ZfsBackend {
    /// Opens the backend on the parent dataset `parent` (`pool/cowsnap`),
    /// creating it (with `mountpoint=none`) when its own parent exists, and
    /// its three area datasets.
    pub fn open(parent: &str) -> Result<Self> {
        Self::open_with(parent, ZfsTool::default())
    }

    fn open_with(parent: &str, tool: ZfsTool) -> Result<Self> {
        cmd::validate_dataset_name(parent).map_err(|e| {
            Error::FailedPrecondition(format!("zfs.dataset {parent:?} is not usable: {e}"))
        })?;
        let backend = ZfsBackend {
            parent: parent.to_owned(),
            tool,
        };
        let list = [
            "list",
            "-H",
            "-p",
            "-o",
            "name,type",
            "-t",
            "filesystem,volume",
            "-d",
            "1",
            parent,
        ];
        let existing: HashSet<String> = match backend.tool.run(&list) {
            Ok(out) => {
                if let Some(row) = rows(&out).find(|r| r[0] == parent)
                    && row.get(1) != Some(&"filesystem")
                {
                    return Err(Error::FailedPrecondition(format!(
                        "zfs.dataset {parent} is a {}, not a filesystem",
                        row.get(1).unwrap_or(&"?")
                    )));
                }
                rows(&out).map(|r| r[0].to_owned()).collect()
            }
            Err(e) if e.is_missing() => {
                backend
                    .tool
                    .run(&["create", "-o", "mountpoint=none", parent])
                    .map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "zfs.dataset {parent} does not exist and cannot be created \
                             (does its pool or parent dataset exist?): {}",
                            e.stderr
                        ))
                    })?;
                info!(dataset = parent, "created the parent dataset");
                HashSet::new()
            }
            Err(e) if e.not_started => {
                return Err(Error::FailedPrecondition(format!(
                    "the zfs backend needs the zfs command: {}",
                    e.stderr
                )));
            }
            Err(e) => return Err(e.into_error()),
        };
        for kind in AREAS {
            let area = backend.area(kind);
            if existing.contains(&area) {
                continue;
            }
            match backend
                .tool
                .run(&["create", "-o", "mountpoint=legacy", &area])
            {
                Ok(_) => {}
                // Another process made it meanwhile: fine.
                Err(e) if e.stderr.contains("already exists") => {}
                Err(e) => return Err(e.into_error()),
            }
        }
        Ok(backend)
    }

    /// The parent dataset.
    pub fn parent(&self) -> &str {
        &self.parent
    }

    fn area(&self, kind: Kind) -> String {
        format!("{}/{}", self.parent, area_name(kind))
    }

    /// The dataset of object `id` in the area of `kind`.
    fn dataset(&self, kind: Kind, id: SnapshotId) -> String {
        format!("{}/{}/{}", self.parent, area_name(kind), id.0)
    }

    fn origin_of(&self, id: SnapshotId) -> String {
        format!("{}@{ORIGIN_SNAPSHOT}", self.dataset(Kind::Committed, id))
    }

    /// Objects (files, directories, ...) the dataset holds, summed over
    /// owners; `None` where the pool does not count objects.
    fn objects(&self, dataset: &str) -> Option<u64> {
        match self
            .tool
            .run(&["userspace", "-H", "-p", "-o", "objused", dataset])
        {
            Ok(out) => cmd::sum_objused(&out),
            Err(e) => {
                debug!(dataset, error = %e.stderr, "no object counts");
                None
            }
        }
    }

    /// Usage of the object and its absolute object count, if known.
    fn measure(&self, obj: &ObjectRef, dataset: &str) -> Result<(Usage, Option<u64>)> {
        let size = self.tool.get_u64("written", dataset)?;
        let objects = self.objects(dataset);
        let inodes = objects.map_or(0, |n| n.saturating_sub(obj.inode_base));
        Ok((Usage { size, inodes }, objects))
    }

    /// The new dataset's guid and (for a clone of `parent`'s origin) the
    /// object count it inherited, in one `zfs get`.
    fn describe_new(&self, dataset: &str, parent: Option<SnapshotId>) -> Result<(u64, u64)> {
        let Some(pid) = parent else {
            return Ok((self.tool.get_u64("guid", dataset)?, EMPTY_OBJECTS));
        };
        let parent_ds = self.dataset(Kind::Committed, pid);
        let props = format!("guid,{OBJECTS_PROPERTY}");
        let out = self.tool.run_checked(&[
            "get",
            "-H",
            "-p",
            "-o",
            "name,property,value",
            &props,
            dataset,
            &parent_ds,
        ])?;
        let value = |name: &str, prop: &str| {
            rows(&out)
                .find(|r| r.len() >= 3 && r[0] == name && r[1] == prop)
                .and_then(|r| cmd::parse_u64(r[2]))
        };
        let guid = value(dataset, "guid")
            .ok_or_else(|| Error::Internal(format!("zfs get guid {dataset}: no number")))?;
        // Committed by an older cowsnap, or the pool counts no objects: ask.
        let base = value(&parent_ds, OBJECTS_PROPERTY)
            .or_else(|| self.objects(&self.origin_of(pid)))
            .unwrap_or(0);
        Ok((guid, base))
    }

    /// Numeric properties of object `id`'s dataset, in whichever area it
    /// is: (dataset, values in the order asked). One command for the three
    /// possible names.
    fn object_properties(&self, id: SnapshotId, props: &[&str]) -> Result<(String, Vec<u64>)> {
        let names: Vec<String> = AREAS.iter().map(|k| self.dataset(*k, id)).collect();
        let list = props.join(",");
        let mut args = vec![
            "get",
            "-H",
            "-p",
            "-o",
            "name,property,value",
            list.as_str(),
        ];
        args.extend(names.iter().map(String::as_str));
        let (out, err) = self.tool.run_partial(&args).map_err(|e| e.into_error())?;
        let rows: Vec<Vec<&str>> = rows(&out).filter(|r| r.len() >= 3).collect();
        let Some(dataset) = rows.first().map(|r| r[0].to_owned()) else {
            return Err(match err {
                Some(e) if !e.is_missing() => e.into_error(),
                _ => Error::NotFound(format!("dataset of object {id}")),
            });
        };
        let values = props
            .iter()
            .map(|p| {
                rows.iter()
                    .find(|r| r[0] == dataset && r[1] == *p)
                    .and_then(|r| cmd::parse_u64(r[2]))
                    .ok_or_else(|| Error::Internal(format!("zfs get {p} {dataset}: no number")))
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok((dataset, values))
    }

    fn set_readonly(&self, dataset: &str, on: bool) -> Result<()> {
        let value = if on { "readonly=on" } else { "readonly=off" };
        self.tool.run_checked(&["set", value, dataset]).map(|_| ())
    }

    fn snapshot_exists(&self, snapshot: &str) -> Result<bool> {
        match self
            .tool
            .run(&["list", "-H", "-o", "name", "-t", "snapshot", snapshot])
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e.into_error()),
        }
    }

    /// Destroys the origin snapshot of `dataset` if it has one (ZFS refuses
    /// while clones of it exist).
    fn destroy_origin_snapshot(&self, dataset: &str) -> Result<()> {
        let snap = format!("{dataset}@{ORIGIN_SNAPSHOT}");
        match self.tool.run(&["destroy", &snap]) {
            Ok(_) => Ok(()),
            Err(e) if e.is_missing() => Ok(()),
            Err(e) => Err(e.into_error()),
        }
    }

    /// The last steps of a commit, after the rename; undone by the caller
    /// on error.
    fn freeze(&self, obj: &ObjectRef, dataset: &str) -> Result<Usage> {
        crate::failpoint::hit("commit.after_rename")?;
        // The rename was a sync task: every write made before it is on disk
        // and counted. Measured before the snapshot, after which `written`
        // would count from it.
        let (usage, objects) = self.measure(obj, dataset)?;
        // A sync task too; the object count goes with it for the children.
        let mut args = vec!["set".to_owned(), "readonly=on".to_owned()];
        if let Some(n) = objects {
            args.push(format!("{OBJECTS_PROPERTY}={n}"));
        }
        args.push(dataset.to_owned());
        self.tool.run_checked(&args)?;
        let snap = format!("{dataset}@{ORIGIN_SNAPSHOT}");
        self.tool.run_checked(&["snapshot", &snap])?;
        Ok(usage)
    }

    /// Checks that destroying `dataset` (with everything below it) touches
    /// nothing cowsnap does not own, then destroys it. `listing` is the
    /// recursive listing of the dataset: name, type, clones, mounted, guid.
    fn destroy_checked(&self, dataset: &str, listing: &[Vec<&str>], native: u64) -> Result<()> {
        let own_snapshot = format!("{dataset}@{ORIGIN_SNAPSHOT}");
        let mut foreign = Vec::new();
        for row in listing {
            let (name, kind, clones, mounted) = (row[0], row[1], row[2], row[3]);
            // Someone else's snapshots and bookmarks (replication tools).
            if (kind == "snapshot" || kind == "bookmark") && name != own_snapshot {
                foreign.push(name.to_owned());
            }
            if kind == "snapshot" && !clones.is_empty() && clones != "-" {
                return Err(Error::FailedPrecondition(format!(
                    "cannot destroy {dataset}: snapshot {name} has dependent clones ({clones})"
                )));
            }
            if mounted == "yes" {
                return Err(Error::FailedPrecondition(format!(
                    "cannot destroy {dataset}: {name} is mounted; unmount it first"
                )));
            }
            if name == dataset
                && native != 0
                && let Some(guid) = row.get(4).and_then(|g| cmd::parse_u64(g))
                && guid != native
            {
                warn!(
                    dataset,
                    recorded = native,
                    found = guid,
                    "object's dataset guid differs from the record; destroying the dataset found under its name"
                );
            }
        }
        if !foreign.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "cannot destroy {dataset}: it has snapshots or bookmarks cowsnap did not take ({}); \
                 cowsnap destroys nothing while they exist: destroy them (zfs destroy) \
                 or exclude {} from the tool that takes them",
                foreign.join(", "),
                self.parent
            )));
        }
        match self.tool.run(&["destroy", "-r", dataset]) {
            Ok(_) => Ok(()),
            Err(e) if e.is_missing() => Ok(()),
            Err(e) => Err(e.into_error()),
        }
    }
}

impl Backend for ZfsBackend {
    fn describe(&self) -> String {
        format!("zfs dataset {}", self.parent)
    }

    fn create(&self, id: SnapshotId, kind: Kind, parent: Option<&ObjectRef>) -> Result<ObjectRef> {
        if kind == Kind::Committed {
            return Err(Error::Internal(
                "committed objects are made by commit".into(),
            ));
        }
        let dataset = self.dataset(kind, id);
        let mut args: Vec<String> = match parent {
            Some(_) => vec!["clone".into()],
            None => vec!["create".into()],
        };
        args.extend(["-o".into(), "mountpoint=legacy".into()]);
        if kind == Kind::View {
            args.extend(["-o".into(), "readonly=on".into()]);
        }
        if let Some(p) = parent {
            args.push(self.origin_of(p.id));
        }
        args.push(dataset.clone());
        self.tool.run_checked(&args)?;
        let described =
            self.describe_new(&dataset, parent.map(|p| p.id))
                .map(|(native, inode_base)| ObjectRef {
                    id,
                    native,
                    inode_base,
                    tree_base: None,
                });
        if described.is_err()
            && let Err(e) = self.tool.run(&["destroy", &dataset])
        {
            warn!(dataset, error = %e.stderr, "could not destroy a dataset whose create failed; left for cleanup");
        }
        described
    }

    fn commit(&self, obj: &ObjectRef) -> Result<Usage> {
        let from = self.dataset(Kind::Active, obj.id);
        let to = self.dataset(Kind::Committed, obj.id);
        self.tool.run_checked(&["rename", &from, &to])?;
        match self.freeze(obj, &to) {
            Ok(usage) => Ok(usage),
            Err(e) => {
                let found = FoundObject {
                    id: obj.id,
                    area: Kind::Committed,
                    readonly: false,
                    native: obj.native,
                };
                if let Err(u) = self.reconcile(&found, Kind::Active) {
                    warn!(dataset = to, error = %u, "could not undo a failed commit; startup repair will");
                }
                Err(e)
            }
        }
    }

    fn reconcile(&self, found: &FoundObject, kind: Kind) -> Result<()> {
        let mut dataset = self.dataset(found.area, found.id);
        if found.area == Kind::Committed && kind != Kind::Committed {
            // An interrupted or undone commit: no record names the snapshot
            // committed, so nothing can have cloned its origin snapshot.
            self.destroy_origin_snapshot(&dataset)?;
        }
        if kind == Kind::Active {
            self.set_readonly(&dataset, false)?;
        }
        if found.area != kind {
            let to = self.dataset(kind, found.id);
            self.tool.run_checked(&["rename", &dataset, &to])?;
            dataset = to;
        }
        if kind != Kind::Active {
            self.set_readonly(&dataset, true)?;
        }
        if kind == Kind::Committed {
            let snap = format!("{dataset}@{ORIGIN_SNAPSHOT}");
            if !self.snapshot_exists(&snap)? {
                self.tool.run_checked(&["snapshot", &snap])?;
            }
        }
        Ok(())
    }

    fn destroy(&self, id: SnapshotId, native: u64) -> Result<()> {
        let names: Vec<String> = AREAS.iter().map(|k| self.dataset(*k, id)).collect();
        let mut args = vec![
            "list",
            "-H",
            "-p",
            "-o",
            "name,type,clones,mounted,guid",
            "-t",
            "all",
            "-r",
        ];
        args.extend(names.iter().map(String::as_str));
        // Lists the datasets that exist (and fails for the others).
        let (out, err) = self.tool.run_partial(&args).map_err(|e| e.into_error())?;
        if let Some(e) = err
            && !e.is_missing()
        {
            return Err(e.into_error());
        }
        let all: Vec<Vec<&str>> = rows(&out).filter(|r| r.len() >= 5).collect();
        for dataset in &names {
            let below = format!("{dataset}/");
            let snaps = format!("{dataset}@");
            let listing: Vec<Vec<&str>> = all
                .iter()
                .filter(|r| r[0] == dataset || r[0].starts_with(&below) || r[0].starts_with(&snaps))
                .cloned()
                .collect();
            if !listing.is_empty() {
                self.destroy_checked(dataset, &listing, native)?;
            }
        }
        Ok(())
    }

    fn usage(&self, obj: &ObjectRef, kind: Kind) -> Result<Usage> {
        self.measure(obj, &self.dataset(kind, obj.id))
            .map(|(usage, _)| usage)
    }

    fn mounts(&self, obj: &ObjectRef, kind: Kind) -> Result<Vec<Mount>> {
        let mode = if kind == Kind::Active { "rw" } else { "ro" };
        Ok(vec![Mount {
            fs_type: "zfs".into(),
            source: self.dataset(kind, obj.id),
            options: vec![mode.into()],
        }])
    }

    fn scan(&self) -> Result<Vec<FoundObject>> {
        // One listing: the areas (depth 1), their datasets (2) and those
        // datasets' snapshots (3).
        let out = self.tool.run_checked(&[
            "list",
            "-H",
            "-p",
            "-o",
            "name,type,readonly,guid",
            "-t",
            "filesystem,snapshot",
            "-d",
            "3",
            &self.parent,
        ])?;
        let prefix = format!("{}/", self.parent);
        let mut objects = Vec::new();
        let mut has_origin: HashSet<SnapshotId> = HashSet::new();
        for row in rows(&out).filter(|r| r.len() >= 4) {
            let Some(rest) = row[0].strip_prefix(&prefix) else {
                continue;
            };
            if let Some((ds, snap)) = rest.split_once('@') {
                if snap == ORIGIN_SNAPSHOT
                    && let Some(("committed", id)) = ds.split_once('/')
                    && let Some(id) = parse_id(id)
                {
                    has_origin.insert(id);
                }
                continue;
            }
            let mut parts = rest.split('/');
            let (Some(area), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let Some(kind) = AREAS.iter().copied().find(|k| area_name(*k) == area) else {
                continue;
            };
            let Some(id) = parse_id(name) else {
                warn!(
                    dataset = row[0],
                    "ignoring a dataset that cowsnap did not create"
                );
                continue;
            };
            objects.push(FoundObject {
                id,
                area: kind,
                readonly: row[2] == "on",
                native: cmd::parse_u64(row[3]).unwrap_or(0),
            });
        }
        // A committed dataset is complete only with its origin snapshot.
        for o in &mut objects {
            if o.area == Kind::Committed && !has_origin.contains(&o.id) {
                o.readonly = false;
            }
        }
        // Clones before their origins (a child's id is above its parent's),
        // so destroying orphans in this order never meets a dependent clone.
        let rank: HashMap<Kind, u8> = [(Kind::Active, 0), (Kind::View, 1), (Kind::Committed, 2)]
            .into_iter()
            .collect();
        objects.sort_by_key(|o| (rank[&o.area], std::cmp::Reverse(o.id)));
        Ok(objects)
    }

    fn cleanup(&self, _live: &[FoundObject]) -> Result<BackendCleanup> {
        // ZFS keeps no accounting outside the datasets themselves.
        Ok(BackendCleanup::default())
    }

    fn space(&self, obj: &ObjectRef) -> Result<ObjectSpace> {
        // `used` of a clone excludes its origin's blocks: what only it holds.
        let (_, v) = self.object_properties(obj.id, &["used", "referenced"])?;
        Ok(ObjectSpace {
            exclusive: v[0],
            referenced: v[1],
        })
    }

    fn set_limit(&self, obj: &ObjectRef, limit: Option<u64>) -> Result<()> {
        // `quota` caps `used`, which for a clone counts only what it wrote
        // (`refquota` would count the parent's data too).
        let (dataset, _) = self.object_properties(obj.id, &["used"])?;
        let value = match limit {
            Some(bytes) => format!("quota={bytes}"),
            None => "quota=none".to_owned(),
        };
        self.tool
            .run_checked(&["set", &value, &dataset])
            .map(|_| ())
    }

    fn filesystem_space(&self) -> Result<FilesystemSpace> {
        let used = self.tool.get_u64("used", &self.parent)?;
        let available = self.tool.get_u64("available", &self.parent)?;
        Ok(FilesystemSpace {
            total: used.saturating_add(available),
            used,
        })
    }

    fn accounting(&self) -> Result<AccountingState> {
        // ZFS accounts space per dataset itself, always consistent.
        Ok(AccountingState {
            mode: "zfs".into(),
            consistent: true,
        })
    }

    fn exists(&self, obj: &ObjectRef, kind: Kind) -> Result<bool> {
        let dataset = self.dataset(kind, obj.id);
        match self
            .tool
            .run(&["list", "-H", "-o", "name", "-t", "filesystem", &dataset])
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e.into_error()),
        }
    }

    fn location(&self, obj: &ObjectRef, kind: Kind) -> String {
        self.dataset(kind, obj.id)
    }
}

fn area_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Active => "active",
        Kind::View => "view",
        Kind::Committed => "committed",
    }
}

/// Parses an object name: a canonical decimal id (no sign, no leading zero).
fn parse_id(name: &str) -> Option<SnapshotId> {
    if name.is_empty()
        || (name.len() > 1 && name.starts_with('0'))
        || !name.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    name.parse().ok().map(SnapshotId)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::testutil::{ZfsMount, ZfsScratch, zfs, zpool};
    use super::*;
    use crate::error::Code;

    /// The backend on a fresh scratch dataset, or None (test skipped) where
    /// this host has no ZFS.
    fn backend() -> Option<(ZfsScratch, ZfsBackend)> {
        let Some(scratch) = ZfsScratch::new().expect("scratch dataset") else {
            eprintln!("skipped: no ZFS here (set COWSNAP_TEST_ZPOOL, or run hack/vm-test)");
            return None;
        };
        let parent = format!("{}/cs", scratch.dataset());
        let b = ZfsBackend::open(&parent).expect("open");
        Some((scratch, b))
    }

    fn pool_of(b: &ZfsBackend) -> &str {
        b.parent.split('/').next().unwrap()
    }

    fn write_files(dir: &Path, big: usize, small: usize) {
        std::fs::write(dir.join("big"), vec![7u8; big]).unwrap();
        for i in 0..small {
            std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
        }
    }

    fn exists(name: &str) -> bool {
        zfs(&["list", "-H", "-o", "name", "-t", "all", name]).is_ok()
    }

    use std::path::Path;

    #[test]
    fn open_creates_parent_and_areas_and_checks_the_name() {
        let Some((scratch, b)) = backend() else {
            return;
        };
        for area in ["active", "view", "committed"] {
            let ds = format!("{}/{area}", b.parent());
            let mp = zfs(&["get", "-H", "-o", "value", "mountpoint", &ds]).unwrap();
            assert_eq!(mp.trim(), "legacy", "{ds}");
        }
        // Reopening finds everything in place.
        ZfsBackend::open(b.parent()).expect("reopen");
        let e = ZfsBackend::open("nosuchpool-cowsnap/x")
            .err()
            .expect("missing pool");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.to_string().contains("cannot be created"), "{e}");
        let e = ZfsBackend::open(&format!("{}/a b", scratch.dataset()))
            .err()
            .expect("bad name");
        assert_eq!(e.code(), Code::FailedPrecondition);
    }

    #[test]
    fn commit_clone_view_and_usage() {
        let Some((_scratch, b)) = backend() else {
            return;
        };
        let a = b.create(SnapshotId(1), Kind::Active, None).unwrap();
        let m = b.mounts(&a, Kind::Active).unwrap();
        assert_eq!(m[0].fs_type, "zfs");
        assert_eq!(m[0].source, format!("{}/active/1", b.parent()));
        assert_eq!(m[0].options, ["rw"]);
        {
            let mnt = ZfsMount::new(&m[0].source, false).unwrap();
            let mode = std::fs::metadata(mnt.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o755);
            write_files(mnt.path(), 1 << 20, 10);
        }
        let u = b.commit(&a).unwrap();
        assert!(
            u.size >= 1 << 20 && u.size < (1 << 20) + (256 << 10),
            "committed usage {u:?}"
        );
        assert_eq!(u.inodes, 11, "{u:?}");
        let found = b.scan().unwrap();
        assert_eq!(
            found,
            [FoundObject {
                id: SnapshotId(1),
                area: Kind::Committed,
                readonly: true,
                native: a.native
            }]
        );

        // A child sees the parent's data and counts only its own.
        let c = b.create(SnapshotId(2), Kind::Active, Some(&a)).unwrap();
        {
            let mnt = ZfsMount::new(&b.mounts(&c, Kind::Active).unwrap()[0].source, false).unwrap();
            assert_eq!(
                std::fs::read(mnt.path().join("big")).unwrap().len(),
                1 << 20
            );
            std::fs::write(mnt.path().join("more"), vec![1u8; 512 << 10]).unwrap();
        }
        zpool(&["sync", pool_of(&b)]).unwrap();
        let u = b.usage(&c, Kind::Active).unwrap();
        assert!(
            u.size >= 512 << 10 && u.size < 768 << 10,
            "active usage {u:?}"
        );
        assert_eq!(u.inodes, 1, "{u:?}");

        // A view is read-only, through its mount options and the dataset.
        let v = b.create(SnapshotId(3), Kind::View, Some(&a)).unwrap();
        let vm = b.mounts(&v, Kind::View).unwrap();
        assert_eq!(vm[0].options, ["ro"]);
        let mnt = ZfsMount::new(&vm[0].source, false).unwrap();
        let err = std::fs::write(mnt.path().join("x"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        drop(mnt);

        // The parent cannot go while clones exist; nothing is touched.
        let e = b.destroy(SnapshotId(1), a.native).unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.to_string().contains("dependent clones"), "{e}");
        assert!(exists(&b.origin_of(SnapshotId(1))));
        for (id, native) in [(2, c.native), (3, v.native), (1, a.native)] {
            b.destroy(SnapshotId(id), native).unwrap();
        }
        assert!(b.scan().unwrap().is_empty());
    }

    #[test]
    fn destroy_is_idempotent() {
        let Some((_scratch, b)) = backend() else {
            return;
        };
        b.destroy(SnapshotId(42), 0).unwrap();
        let a = b.create(SnapshotId(42), Kind::Active, None).unwrap();
        assert!(b.exists(&a, Kind::Active).unwrap());
        assert!(!b.exists(&a, Kind::View).unwrap());
        b.destroy(SnapshotId(42), a.native).unwrap();
        b.destroy(SnapshotId(42), a.native).unwrap();
        assert!(!exists(&b.dataset(Kind::Active, SnapshotId(42))));
        assert!(!b.exists(&a, Kind::Active).unwrap());
    }

    #[test]
    fn destroy_refuses_snapshots_taken_by_others_and_destroys_nothing() {
        let Some((_scratch, b)) = backend() else {
            return;
        };
        let a = b.create(SnapshotId(5), Kind::Active, None).unwrap();
        b.commit(&a).unwrap();
        let ds = b.dataset(Kind::Committed, SnapshotId(5));
        let foreign = format!("{ds}@autosnap_hourly");
        zfs(&["snapshot", &foreign]).unwrap();
        let e = b.destroy(SnapshotId(5), a.native).unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.to_string().contains("autosnap_hourly"), "{e}");
        assert!(exists(&ds) && exists(&foreign) && exists(&b.origin_of(SnapshotId(5))));
        zfs(&["destroy", &foreign]).unwrap();
        b.destroy(SnapshotId(5), a.native).unwrap();
        assert!(!exists(&ds));
    }

    #[test]
    fn destroy_refuses_a_mounted_dataset() {
        let Some((_scratch, b)) = backend() else {
            return;
        };
        let a = b.create(SnapshotId(6), Kind::Active, None).unwrap();
        let ds = b.dataset(Kind::Active, SnapshotId(6));
        let mnt = ZfsMount::new(&ds, false).unwrap();
        let e = b.destroy(SnapshotId(6), a.native).unwrap_err();
        assert!(e.to_string().contains("mounted"), "{e}");
        drop(mnt);
        b.destroy(SnapshotId(6), a.native).unwrap();
    }

    #[test]
    fn interrupted_commit_is_found_incomplete_and_reconciled() {
        let Some((_scratch, b)) = backend() else {
            return;
        };
        let a = b.create(SnapshotId(7), Kind::Active, None).unwrap();
        // A crash after the rename and the read-only flag, before the
        // origin snapshot.
        let (from, to) = (
            b.dataset(Kind::Active, SnapshotId(7)),
            b.dataset(Kind::Committed, SnapshotId(7)),
        );
        zfs(&["rename", &from, &to]).unwrap();
        zfs(&["set", "readonly=on", &to]).unwrap();
        let found = b.scan().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].area, Kind::Committed);
        assert!(!found[0].readonly, "incomplete without the origin snapshot");

        b.reconcile(&found[0], Kind::Active).unwrap();
        let found = b.scan().unwrap();
        assert_eq!((found[0].area, found[0].readonly), (Kind::Active, false));

        // And the other way: finishing a commit whose record was written.
        zfs(&["rename", &from, &to]).unwrap();
        let found = b.scan().unwrap();
        b.reconcile(&found[0], Kind::Committed).unwrap();
        let found = b.scan().unwrap();
        assert_eq!((found[0].area, found[0].readonly), (Kind::Committed, true));
        assert!(exists(&b.origin_of(SnapshotId(7))));
        b.create(SnapshotId(8), Kind::View, Some(&a)).unwrap();
    }

    #[test]
    fn size_limit_caps_what_a_clone_writes() {
        let Some((_scratch, b)) = backend() else {
            return;
        };
        let a = b.create(SnapshotId(10), Kind::Active, None).unwrap();
        {
            let mnt = ZfsMount::new(&b.dataset(Kind::Active, SnapshotId(10)), false).unwrap();
            write_files(mnt.path(), 4 << 20, 0);
        }
        b.commit(&a).unwrap();
        let c = b.create(SnapshotId(11), Kind::Active, Some(&a)).unwrap();
        // Below the parent's size: the limit counts only the clone's writes.
        b.set_limit(&c, Some(2 << 20)).unwrap();
        let mnt = ZfsMount::new(&b.dataset(Kind::Active, SnapshotId(11)), false).unwrap();
        std::fs::write(mnt.path().join("small"), vec![1u8; 512 << 10]).unwrap();
        zpool(&["sync", pool_of(&b)]).unwrap();
        let written = {
            use std::io::Write;
            let mut f = std::fs::File::create(mnt.path().join("more")).unwrap();
            let mut result = Ok(());
            for _ in 0..16 {
                result = f.write_all(&[2u8; 1 << 20]).and_then(|()| f.sync_all());
                if result.is_err() {
                    break;
                }
            }
            result
        };
        let err = written.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
        drop(mnt);
        let s = b.space(&c).unwrap();
        assert!(s.exclusive < 3 << 20 && s.referenced > 4 << 20, "{s:?}");
        b.set_limit(&c, None).unwrap();
        assert_eq!(
            zfs(&[
                "get",
                "-Hp",
                "-o",
                "value",
                "quota",
                &b.location(&c, Kind::Active)
            ])
            .unwrap()
            .trim(),
            "0"
        );
        let fs = b.filesystem_space().unwrap();
        assert!(fs.total > fs.used && fs.used > 4 << 20, "{fs:?}");
    }

    #[test]
    fn scan_ignores_datasets_cowsnap_did_not_create() {
        let Some((_scratch, b)) = backend() else {
            return;
        };
        zfs(&["create", &format!("{}/active/not-an-id", b.parent())]).unwrap();
        zfs(&["create", &format!("{}/other", b.parent())]).unwrap();
        b.create(SnapshotId(9), Kind::Active, None).unwrap();
        let ids: Vec<u64> = b.scan().unwrap().iter().map(|f| f.id.0).collect();
        assert_eq!(ids, [9]);
    }
}
