//! The btrfs backend: one subvolume per snapshot.
//!
//! Layout under the root (all names are snapshot ids in decimal; a client's
//! key never reaches the filesystem):
//!
//! ```text
//! <root>/active/<id>      writable subvolume (snapshot of the parent, or empty)
//! <root>/view/<id>        read-only snapshot of the parent
//! <root>/committed/<id>   former active subvolume, read-only flag set
//! ```
//!
//! Commit renames the subvolume into the committed area, sets its
//! read-only flag and makes the data durable (syncfs); it keeps its
//! subvolume id and therefore its quota group, so the bytes it wrote stay
//! accounted to it.
//! Usage is read from the quota tree (simple quotas where the kernel has
//! them, full qgroups otherwise); nothing walks files.

pub mod ioctl;
#[doc(hidden)]
pub mod testutil;

use std::ffi::OsStr;
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, renameat};
use nix::sys::stat::Mode;
use tracing::{info, warn};

use self::ioctl::{QuotaMode, SubvolId};
use crate::backend::sync_batch::SyncBatcher;
use crate::backend::{
    AccountingState, Backend, BackendCleanup, FilesystemSpace, FoundObject, ObjectSpace,
};
use crate::config::QuotaSetting;
use crate::error::{Error, IoContext, Result};
use crate::meta::ObjectRef;
use crate::model::{Kind, Mount, SnapshotId, Usage};

/// Inode number of a subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
const SUBVOL_ROOT_INODE: u64 = 256;

/// The btrfs backend over a root directory on a btrfs filesystem.
pub struct BtrfsBackend {
    root: PathBuf,
    root_fd: OwnedFd,
    areas: [(Kind, OwnedFd); 3],
    quota: QuotaMode,
    /// Concurrent commits share filesystem syncs.
    syncs: SyncBatcher,
    /// Whether Commit makes the data durable (see [`Self::with_commit_sync`]).
    commit_sync: bool,
}

impl BtrfsBackend {
    /// Opens the backend on `root`, which must be on btrfs, creating the
    /// area directories and enabling quotas as `quota` asks (an already
    /// enabled mode is kept).
    pub fn open(root: &Path, quota: QuotaSetting) -> Result<Self> {
        let root_fd = open_dir(root)?;
        if !ioctl::is_btrfs(root_fd.as_fd()).context(|| format!("statfs {}", root.display()))? {
            return Err(Error::FailedPrecondition(format!(
                "{} is not on a btrfs filesystem",
                root.display()
            )));
        }
        let quota = ensure_quota(root, root_fd.as_fd(), quota)?;
        let mut areas = Vec::with_capacity(3);
        for kind in [Kind::Active, Kind::View, Kind::Committed] {
            let dir = root.join(area_name(kind));
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
            }
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .context(|| format!("chmod {}", dir.display()))?;
            areas.push((kind, open_dir(&dir)?));
        }
        let areas: [(Kind, OwnedFd); 3] = areas
            .try_into()
            .map_err(|_| Error::Internal("three areas expected".into()))?;
        Ok(BtrfsBackend {
            root: root.to_owned(),
            root_fd,
            areas,
            quota,
            syncs: SyncBatcher::default(),
            commit_sync: true,
        })
    }

    /// With `false`, Commit skips the `syncfs` that makes the snapshot's
    /// data durable before it is acknowledged (config `btrfs.commit_sync`;
    /// for throwaway hosts and for measuring what durability costs).
    pub fn with_commit_sync(mut self, sync: bool) -> Self {
        self.commit_sync = sync;
        self
    }

    /// The quota mode in use.
    pub fn quota_mode(&self) -> QuotaMode {
        self.quota
    }

    fn area_fd(&self, kind: Kind) -> BorrowedFd<'_> {
        // The array holds every kind exactly once (built in `open`).
        let (_, fd) = self
            .areas
            .iter()
            .find(|(k, _)| *k == kind)
            .unwrap_or(&self.areas[0]);
        fd.as_fd()
    }

    fn path_of(&self, kind: Kind, id: SnapshotId) -> PathBuf {
        self.root.join(area_name(kind)).join(id.0.to_string())
    }

    /// Finds the area holding object `id`, if any.
    fn locate(&self, id: SnapshotId) -> Result<Option<(Kind, PathBuf)>> {
        for kind in [Kind::Active, Kind::Committed, Kind::View] {
            let p = self.path_of(kind, id);
            match fs::symlink_metadata(&p) {
                Ok(_) => return Ok(Some((kind, p))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("stat {}", p.display()), e)),
            }
        }
        Ok(None)
    }

    fn qgroup_usage(&self, native: u64) -> Result<u64> {
        let q = ioctl::qgroup_info(self.root_fd.as_fd(), SubvolId(native))
            .context(|| format!("reading quota group 0/{native}"))?
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "quota group 0/{native} does not exist: btrfs quota accounting is off or was reset"
                ))
            })?;
        Ok(match self.quota {
            // Simple quotas charge each extent to the subvolume that wrote
            // it: referenced == exclusive == bytes this snapshot wrote.
            QuotaMode::Simple => q.referenced,
            // Full qgroups: exclusive = bytes no other subvolume (the parent
            // included) shares.
            QuotaMode::Full => q.exclusive,
        })
    }

    /// Bytes of subvolume `native`'s metadata tree (see
    /// [`ioctl::subvolume_tree_bytes`]).
    fn tree_bytes(&self, native: u64) -> Result<u64> {
        ioctl::subvolume_tree_bytes(self.root_fd.as_fd(), SubvolId(native))
            .context(|| format!("reading the root item of subvolume {native}"))
    }

    /// Usage is the quota figure less what the object's own metadata tree
    /// grew by since it was created: the file data it holds (docs/design.md,
    /// "Usage"). Every block the tree grew by is charged to the object, so
    /// the result never drops below its data; blocks it only copied on
    /// write stay in (a few per changed directory); a tree that shrank
    /// subtracts nothing.
    fn measure(&self, obj: &ObjectRef, fd: BorrowedFd<'_>) -> Result<Usage> {
        let charged = self.qgroup_usage(obj.native)?;
        let size = match obj.tree_base {
            Some(base) => {
                let grown = self.tree_bytes(obj.native)?.saturating_sub(base);
                charged - grown.min(charged)
            }
            None => charged,
        };
        let highest =
            ioctl::highest_inode(fd).context(|| format!("reading inodes of object {}", obj.id))?;
        Ok(Usage {
            size,
            inodes: highest.saturating_sub(obj.inode_base),
        })
    }
}

impl BtrfsBackend {
    /// Puts a failed commit back in the active area (flag cleared first if
    /// it was set); if that fails too, startup repair does it.
    fn undo_commit(&self, id: SnapshotId, fd: BorrowedFd<'_>, sealed: bool) {
        let name = id.0.to_string();
        let undone = if sealed {
            ioctl::set_readonly(fd, false)
        } else {
            Ok(())
        }
        .and_then(|()| {
            renameat(
                self.area_fd(Kind::Committed),
                name.as_str(),
                self.area_fd(Kind::Active),
                name.as_str(),
            )
        });
        if let Err(e) = undone {
            warn!(id = %id, error = %e, "could not move a failed commit back to the active area; startup repair will");
        }
    }
}

impl Backend for BtrfsBackend {
    fn describe(&self) -> String {
        let mode = match self.quota {
            QuotaMode::Simple => "simple quotas",
            QuotaMode::Full => "full qgroups",
        };
        format!("btrfs at {} ({mode})", self.root.display())
    }

    fn create(&self, id: SnapshotId, kind: Kind, parent: Option<&ObjectRef>) -> Result<ObjectRef> {
        if kind == Kind::Committed {
            return Err(Error::Internal(
                "committed objects are made by commit".into(),
            ));
        }
        let name = id.0.to_string();
        let dest = self.area_fd(kind);
        let path = self.path_of(kind, id);
        match parent {
            Some(p) => {
                let src_path = self.path_of(Kind::Committed, p.id);
                let src = open_dir(&src_path)?;
                ioctl::snapshot(src.as_fd(), dest, OsStr::new(&name), kind == Kind::View).context(
                    || format!("snapshotting {} to {}", src_path.display(), path.display()),
                )?;
            }
            None => {
                ioctl::create_subvolume(dest, OsStr::new(&name))
                    .context(|| format!("creating subvolume {}", path.display()))?;
                // A fresh root is 0755 whatever the daemon's umask.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                    .context(|| format!("chmod {}", path.display()))?;
            }
        }
        let fd = open_dir(&path)?;
        let native = ioctl::subvolume_id(fd.as_fd())
            .context(|| format!("subvolume id of {}", path.display()))?;
        if parent.is_none() && kind == Kind::View {
            ioctl::set_readonly(fd.as_fd(), true)
                .context(|| format!("set read-only {}", path.display()))?;
        }
        let inode_base = match parent {
            Some(_) => ioctl::highest_inode(fd.as_fd())
                .context(|| format!("reading inodes of {}", path.display()))?,
            None => SUBVOL_ROOT_INODE,
        };
        // The tree's size at creation: a snapshot starts with its source's
        // (which a committed, read-only source no longer changes); a new
        // empty subvolume from 0, its first leaf being its own metadata
        // like every block it grows by.
        let tree_base = match parent {
            Some(p) => self.tree_bytes(p.native)?,
            None => 0,
        };
        Ok(ObjectRef {
            id,
            native: native.0,
            inode_base,
            tree_base: Some(tree_base),
        })
    }

    fn commit(&self, obj: &ObjectRef) -> Result<Usage> {
        let name = obj.id.0.to_string();
        let from = self.path_of(Kind::Active, obj.id);
        let to = self.path_of(Kind::Committed, obj.id);
        let fd = open_dir(&from)?;
        // The flag comes after the rename: a read-only subvolume cannot
        // move to another directory.
        renameat(
            self.area_fd(Kind::Active),
            name.as_str(),
            self.area_fd(Kind::Committed),
            name.as_str(),
        )
        .context(|| format!("rename {} to {}", from.display(), to.display()))?;
        if let Err(e) = crate::failpoint::hit("commit.after_rename") {
            self.undo_commit(obj.id, fd.as_fd(), false);
            return Err(e);
        }
        // The flag first: it commits a btrfs transaction, which makes the
        // rename durable. Then durability: the flag does not write back
        // dirty data (docs/design.md, "Durability"); syncfs does, and
        // commits a transaction again only if there was any. Concurrent
        // commits share one syncfs that started after all of their writes.
        // Both commits finish before the metadata step, whose fsync is then
        // a log write: in a transaction that renamed a subvolume, btrfs
        // turns an fsync into a full transaction commit.
        let sealed = ioctl::set_readonly(fd.as_fd(), true);
        let done = match sealed {
            Err(e) => Err(Error::io(format!("set read-only {}", to.display()), e)),
            Ok(()) if !self.commit_sync => Ok(()),
            Ok(()) => self
                .syncs
                .sync(|| ioctl::sync_fs(fd.as_fd()).map_err(std::io::Error::from))
                .context(|| format!("syncfs {}", to.display())),
        };
        // A transaction committed after the last write (the flag's, or the
        // sync's if there was data): the quota figures are up to date.
        match done.and_then(|()| self.measure(obj, fd.as_fd())) {
            Ok(usage) => Ok(usage),
            Err(e) => {
                self.undo_commit(obj.id, fd.as_fd(), sealed.is_ok());
                Err(e)
            }
        }
    }

    fn reconcile(&self, found: &FoundObject, kind: Kind) -> Result<()> {
        let name = found.id.0.to_string();
        let path = self.path_of(found.area, found.id);
        let fd = open_dir(&path)?;
        let want_readonly = kind != Kind::Active;
        let mut readonly = found.readonly;
        if found.area != kind {
            // A read-only subvolume cannot move to another directory (its
            // ".." entry would change): clear the flag first.
            if readonly {
                ioctl::set_readonly(fd.as_fd(), false)
                    .context(|| format!("clear read-only {}", path.display()))?;
                readonly = false;
            }
            let to = self.path_of(kind, found.id);
            renameat(
                self.area_fd(found.area),
                name.as_str(),
                self.area_fd(kind),
                name.as_str(),
            )
            .context(|| format!("rename {} to {}", path.display(), to.display()))?;
        }
        if readonly != want_readonly {
            if want_readonly {
                ioctl::sync_fs(fd.as_fd()).context(|| format!("syncfs {}", path.display()))?;
            }
            ioctl::set_readonly(fd.as_fd(), want_readonly)
                .context(|| format!("set read-only={want_readonly} {}", path.display()))?;
        }
        Ok(())
    }

    fn destroy(&self, id: SnapshotId, native: u64) -> Result<()> {
        let Some((_, path)) = self.locate(id)? else {
            return Ok(());
        };
        let fd = match open_dir(&path) {
            Ok(fd) => fd,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let found = ioctl::subvolume_id(fd.as_fd())
            .context(|| format!("subvolume id of {}", path.display()))?;
        if native != 0 && found.0 != native {
            warn!(
                id = %id, recorded = native, found = found.0,
                "object's subvolume id differs from the record; destroying the subvolume found at its path"
            );
        }
        // Nested subvolumes must be unlinked from their parent directory,
        // which a read-only subvolume refuses.
        let nested = ioctl::child_subvolumes(self.root_fd.as_fd(), found)
            .context(|| format!("listing subvolumes nested in {}", path.display()))?;
        if !nested.is_empty()
            && ioctl::is_readonly(fd.as_fd()).context(|| format!("flags of {}", path.display()))?
        {
            ioctl::set_readonly(fd.as_fd(), false)
                .context(|| format!("clear read-only {}", path.display()))?;
        }
        drop(fd);
        match ioctl::delete_subvolume_tree(self.root_fd.as_fd(), found) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io(
                format!("deleting subvolume {} ({})", path.display(), found.0),
                e,
            )),
        }
    }

    fn destroy_in_background(&self) -> bool {
        // Remove succeeds whatever the delete does (a failure leaves an
        // orphan for Cleanup), and btrfs reclaims a deleted subvolume's
        // space in the background anyway.
        true
    }

    fn usage(&self, obj: &ObjectRef, kind: Kind) -> Result<Usage> {
        let path = self.path_of(kind, obj.id);
        let fd = open_dir(&path)?;
        self.measure(obj, fd.as_fd())
    }

    fn mounts(&self, obj: &ObjectRef, kind: Kind) -> Result<Vec<Mount>> {
        let path = self.path_of(kind, obj.id);
        let source = path
            .to_str()
            .ok_or_else(|| {
                Error::Internal(format!("root path {} is not UTF-8", self.root.display()))
            })?
            .to_owned();
        let mode = if kind == Kind::Active { "rw" } else { "ro" };
        Ok(vec![Mount {
            fs_type: "bind".into(),
            source,
            options: vec!["rbind".into(), mode.into()],
        }])
    }

    fn scan(&self) -> Result<Vec<FoundObject>> {
        let mut out = Vec::new();
        for kind in [Kind::Active, Kind::View, Kind::Committed] {
            let dir = self.root.join(area_name(kind));
            for entry in fs::read_dir(&dir).context(|| format!("reading {}", dir.display()))? {
                let entry = entry.context(|| format!("reading {}", dir.display()))?;
                let path = entry.path();
                let Some(id) = entry.file_name().to_str().and_then(parse_id) else {
                    warn!(path = %path.display(), "ignoring an entry that cowsnap did not create");
                    continue;
                };
                let md =
                    fs::symlink_metadata(&path).context(|| format!("stat {}", path.display()))?;
                if !md.is_dir() || md.ino() != SUBVOL_ROOT_INODE {
                    warn!(path = %path.display(), "ignoring an entry that is not a subvolume");
                    continue;
                }
                let fd = open_dir(&path)?;
                let native = ioctl::subvolume_id(fd.as_fd())
                    .context(|| format!("subvolume id of {}", path.display()))?;
                let readonly = ioctl::is_readonly(fd.as_fd())
                    .context(|| format!("flags of {}", path.display()))?;
                out.push(FoundObject {
                    id,
                    area: kind,
                    readonly,
                    native: native.0,
                });
            }
        }
        Ok(out)
    }

    fn cleanup(&self, live: &[FoundObject]) -> Result<BackendCleanup> {
        // Simple quotas keep the quota group of a deleted subvolume until
        // its extents are freed and someone removes it; full qgroups remove
        // them themselves. The kernel refuses (EBUSY) to remove the group of
        // a subvolume that still exists or still holds bytes, so trying the
        // ones cowsnap does not know as live is safe.
        let live: std::collections::HashSet<u64> = live.iter().map(|f| f.native).collect();
        let mut removed = 0;
        let ids = ioctl::qgroup_ids(self.root_fd.as_fd())
            .context(|| "listing quota groups".to_owned())?;
        for q in ids {
            if q < SUBVOL_ROOT_INODE || live.contains(&q) {
                continue;
            }
            match ioctl::qgroup_destroy(self.root_fd.as_fd(), q) {
                Ok(()) => removed += 1,
                Err(Errno::EBUSY) | Err(Errno::ENOENT) | Err(Errno::EINVAL) => {}
                Err(e) => warn!(qgroup = q, error = %e, "could not remove a stale quota group"),
            }
        }
        Ok(BackendCleanup {
            stale_accounting_removed: removed,
        })
    }

    fn space(&self, obj: &ObjectRef) -> Result<ObjectSpace> {
        let q = ioctl::qgroup_info(self.root_fd.as_fd(), SubvolId(obj.native))
            .context(|| format!("reading quota group 0/{}", obj.native))?
            .unwrap_or(ioctl::QgroupUsage {
                referenced: 0,
                exclusive: 0,
            });
        Ok(ObjectSpace {
            exclusive: q.exclusive,
            referenced: q.referenced,
        })
    }

    fn set_limit(&self, obj: &ObjectRef, limit: Option<u64>) -> Result<()> {
        ioctl::qgroup_limit(self.root_fd.as_fd(), obj.native, limit).context(|| {
            format!(
                "setting the limit of quota group 0/{} to {limit:?}",
                obj.native
            )
        })
    }

    fn filesystem_space(&self) -> Result<FilesystemSpace> {
        let st = nix::sys::statvfs::fstatvfs(&self.root_fd)
            .context(|| format!("statvfs {}", self.root.display()))?;
        let frsize = st.fragment_size();
        Ok(FilesystemSpace {
            total: st.blocks().saturating_mul(frsize),
            used: st
                .blocks()
                .saturating_sub(st.blocks_free())
                .saturating_mul(frsize),
        })
    }

    fn accounting(&self) -> Result<AccountingState> {
        let status = ioctl::quota_status(self.root_fd.as_fd())
            .context(|| "reading quota status".to_owned())?;
        Ok(match status {
            None => AccountingState {
                mode: "off".into(),
                consistent: false,
            },
            Some(st) => AccountingState {
                mode: if st.simple { "simple" } else { "full" }.into(),
                consistent: !st.inconsistent,
            },
        })
    }

    fn repair_accounting(&self) -> Result<()> {
        match self.quota {
            // Simple quotas cannot be rescanned (the kernel answers EINVAL);
            // their figures are charged at write time.
            QuotaMode::Simple => Ok(()),
            QuotaMode::Full => ioctl::quota_rescan(self.root_fd.as_fd())
                .context(|| "starting a quota rescan".to_owned()),
        }
    }

    fn exists(&self, obj: &ObjectRef, kind: Kind) -> Result<bool> {
        let path = self.path_of(kind, obj.id);
        match fs::symlink_metadata(&path) {
            Ok(md) => Ok(md.is_dir() && md.ino() == SUBVOL_ROOT_INODE),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        }
    }

    fn location(&self, obj: &ObjectRef, kind: Kind) -> String {
        self.path_of(kind, obj.id).display().to_string()
    }

    fn btrfs_send(&self) -> bool {
        true
    }

    fn adopt(
        &self,
        id: SnapshotId,
        staged: &str,
        parent: Option<&ObjectRef>,
    ) -> Result<(ObjectRef, Usage)> {
        let staged = Path::new(staged);
        let to = self.path_of(Kind::Committed, id);
        let md = fs::symlink_metadata(staged).context(|| format!("stat {}", staged.display()))?;
        if !md.is_dir() || md.ino() != SUBVOL_ROOT_INODE {
            return Err(Error::InvalidArgument(format!(
                "{} is not a subvolume",
                staged.display()
            )));
        }
        let fd = open_dir(staged)?;
        let native = ioctl::subvolume_id(fd.as_fd())
            .context(|| format!("subvolume id of {}", staged.display()))?;
        // A read-only subvolume cannot move to another directory. Clearing
        // the flag with the ioctl keeps a received subvolume's received
        // UUID (btrfs-progs' `property set -f ro false` clears it itself),
        // so later incremental streams still find it as their parent.
        ioctl::set_readonly(fd.as_fd(), false)
            .context(|| format!("clear read-only {}", staged.display()))?;
        fs::rename(staged, &to)
            .context(|| format!("rename {} to {}", staged.display(), to.display()))?;
        self.syncs
            .sync(|| ioctl::sync_fs(fd.as_fd()).map_err(std::io::Error::from))
            .context(|| format!("syncfs {}", to.display()))?;
        ioctl::set_readonly(fd.as_fd(), true)
            .context(|| format!("set read-only {}", to.display()))?;
        let inode_base = match parent {
            Some(p) => {
                let pfd = open_dir(&self.path_of(Kind::Committed, p.id))?;
                ioctl::highest_inode(pfd.as_fd())
                    .context(|| format!("reading inodes of object {}", p.id))?
            }
            None => SUBVOL_ROOT_INODE,
        };
        let tree_base = match parent {
            Some(p) => self.tree_bytes(p.native)?,
            None => 0,
        };
        let obj = ObjectRef {
            id,
            native: native.0,
            inode_base,
            tree_base: Some(tree_base),
        };
        let usage = self.measure(&obj, fd.as_fd())?;
        Ok((obj, usage))
    }
}

/// Enables quotas as configured, or keeps the mode already on.
fn ensure_quota(root: &Path, fd: BorrowedFd<'_>, want: QuotaSetting) -> Result<QuotaMode> {
    if let Some(status) =
        ioctl::quota_status(fd).context(|| format!("quota status of {}", root.display()))?
    {
        let mode = if status.simple {
            QuotaMode::Simple
        } else {
            QuotaMode::Full
        };
        let mismatch = matches!(
            (want, mode),
            (QuotaSetting::Simple, QuotaMode::Full) | (QuotaSetting::Full, QuotaMode::Simple)
        );
        if mismatch {
            warn!(
                configured = ?want, enabled = ?mode,
                "quotas are already enabled in another mode on this filesystem; keeping it"
            );
        }
        if status.inconsistent {
            warn!(
                "btrfs reports its quota accounting inconsistent: usage figures may be wrong until a rescan"
            );
        }
        return Ok(mode);
    }
    let mode = match want {
        QuotaSetting::Simple => QuotaMode::Simple,
        QuotaSetting::Full => QuotaMode::Full,
        QuotaSetting::Auto if simple_quota_supported() => QuotaMode::Simple,
        QuotaSetting::Auto => QuotaMode::Full,
    };
    ioctl::quota_enable(fd, mode)
        .context(|| format!("enabling {mode:?} quotas on {}", root.display()))?;
    let existing: usize = [Kind::Active, Kind::View, Kind::Committed]
        .iter()
        .filter_map(|k| fs::read_dir(root.join(area_name(*k))).ok())
        .map(|entries| entries.count())
        .sum();
    if existing > 0 {
        warn!(
            root = %root.display(), ?mode, objects = existing,
            "quotas were off although snapshots exist (disabled outside cowsnap?); enabled them again. \
             Usage of the existing snapshots is under-counted with simple quotas (their bytes were \
             written while nothing counted them); full qgroups recount after their rescan"
        );
    } else {
        info!(root = %root.display(), ?mode, "enabled btrfs quotas");
    }
    Ok(mode)
}

/// Whether the running kernel supports btrfs simple quotas (>= 6.7).
pub fn simple_quota_supported() -> bool {
    Path::new("/sys/fs/btrfs/features/simple_quota").exists()
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

fn open_dir(path: &Path) -> Result<OwnedFd> {
    open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .context(|| format!("open {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_canonical_decimal_ids() {
        assert_eq!(parse_id("17"), Some(SnapshotId(17)));
        assert_eq!(parse_id("0"), Some(SnapshotId(0)));
        assert_eq!(parse_id("017"), None);
        assert_eq!(parse_id("-1"), None);
        assert_eq!(parse_id("a1"), None);
        assert_eq!(parse_id(""), None);
        assert_eq!(parse_id("99999999999999999999999"), None);
    }
}
