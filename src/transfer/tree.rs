//! The directory tree behind a snapshot's mounts, for export and import to
//! read and write files.
//!
//! A btrfs snapshot's mount is a bind mount of a directory the daemon can
//! use directly. Any other mount (a ZFS dataset, say) is mounted on a
//! private directory under `<root>/transfer-mnt/` for the duration and
//! unmounted when the [`SnapshotTree`] is dropped.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use tracing::warn;

use crate::error::{Error, IoContext, Result};
use crate::model::Mount;
use crate::snapshotter::Snapshotter;

/// Directory of the temporary mount points.
const MOUNT_DIR: &str = "transfer-mnt";

/// A snapshot's files at a path.
pub struct SnapshotTree {
    path: PathBuf,
    mounted: bool,
}

impl SnapshotTree {
    /// The tree of a snapshot with `mounts`; `tag` names a private mount
    /// point if one is needed.
    pub fn new(core: &Snapshotter, mounts: &[Mount], tag: &str) -> Result<Self> {
        let [m] = mounts else {
            return Err(Error::Unimplemented(format!(
                "export and import need a snapshot with one mount, this one has {}",
                mounts.len()
            )));
        };
        if m.fs_type == "bind" {
            return Ok(SnapshotTree {
                path: PathBuf::from(&m.source),
                mounted: false,
            });
        }
        let dir = core.root().join(MOUNT_DIR).join(tag);
        fs::create_dir_all(&dir).context(|| format!("mkdir {}", dir.display()))?;
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => {}
                other => data.push(other),
            }
        }
        let data = data.join(",");
        let mounted = nix::mount::mount(
            Some(m.source.as_str()),
            &dir,
            Some(m.fs_type.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        );
        if let Err(e) = mounted {
            let _ = fs::remove_dir(&dir);
            return Err(Error::io(
                format!("mount {} ({}) on {}", m.source, m.fs_type, dir.display()),
                e,
            ));
        }
        Ok(SnapshotTree {
            path: dir,
            mounted: true,
        })
    }

    /// Where the files are.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SnapshotTree {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if let Err(e) = nix::mount::umount2(&self.path, MntFlags::empty()) {
            warn!(path = %self.path.display(), error = %e, "unmount failed; detaching");
            let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir(&self.path);
    }
}
