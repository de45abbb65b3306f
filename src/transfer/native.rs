//! The native fast path: `btrfs send` / `btrfs receive` streams carried in
//! the archive.
//!
//! Export runs `btrfs send [-p PARENT] SUBVOLUME` on the committed
//! subvolumes themselves (read-only, as send requires, with stable UUIDs, so
//! a later incremental stream can name them as its parent) and stores the
//! stream in entries `layers/<n>/btrfs-send.<seq>` of at most
//! [`CHUNK_SIZE`] bytes (tar needs each entry's size up front).
//!
//! Import runs `btrfs receive` into a staging directory inside the cowsnap
//! root (same filesystem) and hands the received subvolume to the core
//! ([`Snapshotter::adopt_committed`]), which moves it into the committed
//! area: the data is written once, by the receive. The staging directory is
//! always removed; a crash leaves it behind until the next import sweeps
//! the directories of earlier daemon instances.
//!
//! ZFS (`zfs send` / `zfs receive`) would slot in here: a content kind
//! `zfs-send`, `zfs send [-i @parent] <dataset>@<snap>` on export, and on
//! import `zfs receive` into a staging dataset followed by the ZFS backend's
//! `Backend::adopt` (a `zfs rename` into its committed area and
//! `readonly=on`). Missing for that: the ZFS backend's `adopt`, a way to ask
//! the backend for its staging location, and the dataset's send identity
//! (guid) in place of the btrfs UUIDs below.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::JoinHandle;

use tar::{Builder, EntryType, Header};
use tracing::{debug, warn};

use super::archive::{layer_prefix, uuid_hex};
use super::entry::read_error;
use super::pack::sink_error;
use crate::backend::btrfs::ioctl;
use crate::error::{Error, IoContext, Result};
use crate::snapshotter::Snapshotter;

/// Largest `btrfs-send.<seq>` entry.
pub const CHUNK_SIZE: usize = 8 << 20;
/// Name of the chunk entries inside a layer.
pub const CHUNK_NAME: &str = "btrfs-send";
/// Directory of the staging areas inside the cowsnap root.
pub const STAGING_DIR: &str = "staging";

/// Inode number of a subvolume's root directory.
const SUBVOL_ROOT_INODE: u64 = 256;

/// The UUID by which `btrfs send` names the subvolume at `path`, and by
/// which `btrfs receive` finds it as a parent: its received UUID if it has
/// one, else its own (hex). Fails if `path` is not a btrfs subvolume.
pub fn send_identity(path: &Path) -> Result<String> {
    let info = subvolume_info(path)?;
    let known = if info.received_uuid.iter().any(|&b| b != 0) {
        info.received_uuid
    } else {
        info.uuid
    };
    Ok(uuid_hex(&known))
}

/// Whether the subvolume at `path` is known by `identity` to a stream:
/// its own UUID or its received UUID.
pub fn has_identity(path: &Path, identity: &str) -> Result<bool> {
    let info = subvolume_info(path)?;
    Ok(uuid_hex(&info.uuid) == identity || uuid_hex(&info.received_uuid) == identity)
}

fn subvolume_info(path: &Path) -> Result<ioctl::SubvolInfo> {
    let f = fs::File::open(path).context(|| format!("open {}", path.display()))?;
    if !ioctl::is_btrfs(f.as_fd()).context(|| format!("statfs {}", path.display()))? {
        return Err(Error::Unimplemented(format!(
            "{} is not on btrfs: the btrfs-send format needs the btrfs backend",
            path.display()
        )));
    }
    ioctl::subvolume_info(f.as_fd()).context(|| format!("subvolume info of {}", path.display()))
}

/// Writes `btrfs send [-p parent] path` as layer `n`. Returns the number of
/// entries written.
pub fn send_layer<W: Write>(
    builder: &mut Builder<W>,
    n: usize,
    path: &Path,
    parent: Option<&Path>,
) -> Result<u64> {
    let mut cmd = Command::new("btrfs");
    cmd.arg("send").arg("-q");
    if let Some(p) = parent {
        cmd.arg("-p").arg(p);
    }
    cmd.arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(&mut cmd, "btrfs send")?;
    let stderr = drain_stderr(&mut child);
    let result = copy_chunks(builder, n, &mut child);
    if result.is_err() {
        // The sink failed (client gone): stop the send.
        let _ = child.kill();
    }
    let status = child
        .wait()
        .context(|| "waiting for btrfs send".to_owned())?;
    let errors = stderr.join().unwrap_or_default();
    let entries = result?;
    if !status.success() {
        return Err(Error::Internal(format!(
            "btrfs send {} failed ({status}): {}",
            path.display(),
            errors.trim()
        )));
    }
    debug!(path = %path.display(), parent = ?parent, entries, "btrfs send done");
    Ok(entries)
}

fn copy_chunks<W: Write>(builder: &mut Builder<W>, n: usize, child: &mut Child) -> Result<u64> {
    let Some(mut out) = child.stdout.take() else {
        return Err(Error::Internal("btrfs send has no stdout".into()));
    };
    let prefix = layer_prefix(n);
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut seq = 0u64;
    loop {
        // Fill a whole chunk (or up to the end of the stream).
        let mut len = 0;
        while len < buf.len() {
            match out.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(k) => len += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading the btrfs send stream", e)),
            }
        }
        if len == 0 && seq > 0 {
            return Ok(seq);
        }
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(len as u64);
        h.set_mtime(0);
        builder
            .append_data(
                &mut h,
                format!("{prefix}/{CHUNK_NAME}.{seq:06}"),
                &buf[..len],
            )
            .map_err(sink_error)?;
        seq += 1;
        if len < buf.len() {
            return Ok(seq);
        }
    }
}

/// A `btrfs receive` in progress into a staging directory.
pub struct Receiver {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Option<JoinHandle<String>>,
    staging: PathBuf,
    next_seq: u64,
}

impl Receiver {
    /// Creates the staging directory `<root>/staging/<tag>` and starts
    /// `btrfs receive` into it.
    pub fn start(root: &Path, tag: &str) -> Result<Self> {
        let area = root.join(STAGING_DIR);
        match fs::create_dir(&area) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("mkdir {}", area.display()), e)),
        }
        let staging = area.join(tag);
        fs::create_dir(&staging).context(|| format!("mkdir {}", staging.display()))?;
        let mut cmd = Command::new("btrfs");
        cmd.arg("receive")
            .arg("-q")
            .arg(&staging)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = match spawn(&mut cmd, "btrfs receive") {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir(&staging);
                return Err(e);
            }
        };
        let stderr = drain_stderr(&mut child);
        let stdin = child.stdin.take();
        Ok(Receiver {
            child,
            stdin,
            stderr: Some(stderr),
            staging,
            next_seq: 0,
        })
    }

    /// The staging directory (removed by [`remove_staging`]).
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Feeds the chunk entry named `name` (inside the layer) to the receive.
    pub fn feed<R: Read>(&mut self, name: &[u8], data: &mut R) -> Result<()> {
        let want = format!("{CHUNK_NAME}.{:06}", self.next_seq);
        if name != want.as_bytes() {
            return Err(Error::InvalidArgument(format!(
                "archive: expected entry {want} of a btrfs-send layer, found {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        self.next_seq += 1;
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(Error::Internal("btrfs receive has no stdin".into()));
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = data.read(&mut buf).map_err(read_error)?;
            if n == 0 {
                return Ok(());
            }
            if let Err(e) = stdin.write_all(&buf[..n]) {
                // The receive died: its own message says why.
                let _ = self.stdin.take();
                return Err(self.failure(Some(e)));
            }
        }
    }

    /// Ends the stream, waits for the receive and returns the path of the
    /// received subvolume.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.next_seq == 0 {
            return Err(Error::InvalidArgument(
                "archive: a btrfs-send layer has no data".into(),
            ));
        }
        drop(self.stdin.take());
        let status = self
            .child
            .wait()
            .context(|| "waiting for btrfs receive".to_owned())?;
        if !status.success() {
            return Err(self.failure(None));
        }
        let mut found = Vec::new();
        for entry in
            fs::read_dir(&self.staging).context(|| format!("reading {}", self.staging.display()))?
        {
            let entry = entry.context(|| format!("reading {}", self.staging.display()))?;
            found.push(entry.path());
        }
        match found.as_slice() {
            [one] if is_subvolume(one)? => Ok(one.clone()),
            _ => Err(Error::InvalidArgument(format!(
                "btrfs receive made {} entries in {}, expected one subvolume",
                found.len(),
                self.staging.display()
            ))),
        }
    }

    /// Stops the receive (on an error elsewhere).
    pub fn abort(mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn failure(&mut self, write: Option<io::Error>) -> Error {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        let errors = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let errors = errors.trim();
        let msg = format!(
            "btrfs receive failed ({}): {}",
            status.map(|s| s.to_string()).unwrap_or_default(),
            if errors.is_empty() {
                write.map(|e| e.to_string()).unwrap_or_default()
            } else {
                errors.to_owned()
            }
        );
        if errors.contains("cannot find parent subvolume") {
            Error::FailedPrecondition(format!(
                "{msg}: the incremental stream's parent is not here (import it from the same source first)"
            ))
        } else if errors.contains("No space left") || errors.contains("Disk quota exceeded") {
            Error::io(msg, io::Error::from_raw_os_error(libc::ENOSPC))
        } else {
            Error::InvalidArgument(msg)
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is_subvolume(path: &Path) -> Result<bool> {
    let md = fs::symlink_metadata(path).context(|| format!("stat {}", path.display()))?;
    Ok(md.is_dir() && md.ino() == SUBVOL_ROOT_INODE)
}

/// Removes a staging directory and every subvolume in it.
pub fn remove_staging(core: &Snapshotter, staging: &Path) {
    if let Err(e) = try_remove_staging(core, staging) {
        warn!(path = %staging.display(), error = %e, "could not remove an import staging directory; the next import retries");
    }
}

fn try_remove_staging(core: &Snapshotter, staging: &Path) -> Result<()> {
    let entries = match fs::read_dir(staging) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", staging.display()), e)),
    };
    let root = fs::File::open(core.root()).context(|| format!("open {}", core.root().display()))?;
    for entry in entries {
        let path = entry
            .context(|| format!("reading {}", staging.display()))?
            .path();
        if is_subvolume(&path)? {
            let f = fs::File::open(&path).context(|| format!("open {}", path.display()))?;
            let id = ioctl::subvolume_id(f.as_fd())
                .context(|| format!("subvolume id of {}", path.display()))?;
            drop(f);
            ioctl::delete_subvolume_tree(root.as_fd(), id)
                .context(|| format!("deleting subvolume {}", path.display()))?;
        } else if path.is_dir() {
            fs::remove_dir_all(&path).context(|| format!("removing {}", path.display()))?;
        } else {
            fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        }
    }
    fs::remove_dir(staging).context(|| format!("removing {}", staging.display()))
}

/// Removes the staging directories that earlier daemon instances left
/// (a crash during an import); `current` is this instance's tag prefix.
pub fn sweep_staging(core: &Snapshotter, current: &str) {
    let area = core.root().join(STAGING_DIR);
    let Ok(entries) = fs::read_dir(&area) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(current) {
            continue;
        }
        warn!(path = %entry.path().display(), "removing an import staging directory left by an earlier run");
        remove_staging(core, &entry.path());
    }
}

fn spawn(cmd: &mut Command, what: &str) -> Result<Child> {
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::FailedPrecondition(format!(
                "{what}: the btrfs command (btrfs-progs) is not installed"
            ))
        } else {
            Error::io(format!("starting {what}"), e)
        }
    })
}

/// Collects a child's stderr on a thread, so a chatty child never blocks on
/// a full pipe while we read its stdout.
fn drain_stderr(child: &mut Child) -> JoinHandle<String> {
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let mut bytes = Vec::new();
            let _ = e.read_to_end(&mut bytes);
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        s
    })
}
