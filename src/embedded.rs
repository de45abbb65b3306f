//! The "embedded default": a btrfs root on any Linux host.
//!
//! cowsnap needs its root directory on btrfs. When it is not (the usual case
//! on an ext4 or xfs host) and `embedded.enabled` is set, cowsnap keeps a
//! btrfs filesystem in a sparse image file beside the root and mounts it on
//! the root through a loop device, so that `sudo cowsnap serve` works on any
//! host whose kernel has btrfs:
//!
//! 1. the root is created (mode 0700) if it is missing;
//! 2. if it is on btrfs already, nothing else happens;
//! 3. otherwise the image is created (sparse, `mkfs.btrfs`) if it does not
//!    exist, or checked to be a btrfs image if it does, and mounted on the
//!    root with `mount -o loop`;
//! 4. on shutdown [`EmbeddedRoot::release`] unmounts it again, and the next
//!    start mounts the same image: the snapshots survive restarts.
//!
//! Everything done is logged at info level with the paths, the size and the
//! loop device, because a daemon that formats and mounts filesystems on its
//! own must say so.
//!
//! Safety rails: an existing file is never formatted (only a file created in
//! the same call is), a non-empty root is never mounted over (that would hide
//! its contents), and an image created by a call that then fails is removed,
//! so a failed start leaves nothing half made.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};
use nix::sys::statfs::{BTRFS_SUPER_MAGIC, statfs};
use tracing::{debug, info, warn};

use crate::config::EmbeddedConfig;

/// Offset of the magic number in the primary btrfs superblock: the
/// superblock starts at 64 KiB and the magic follows the 32-byte checksum,
/// the 16-byte fsid, the 8-byte bytenr and the 8-byte flags.
const BTRFS_MAGIC_OFFSET: u64 = 0x10040;

/// The btrfs superblock magic, "_BHRfS_M".
const BTRFS_MAGIC: &[u8; 8] = b"_BHRfS_M";

/// Label given to filesystems cowsnap creates, so that `blkid`/`lsblk` show
/// where a stray loop device comes from.
const IMAGE_LABEL: &str = "cowsnap";

/// Mode of the root directory: snapshots hold container filesystems, with
/// their setuid binaries and secrets, which no other user may reach.
const ROOT_MODE: u32 = 0o700;

/// Mode of a created image file: its content is the root's content.
const IMAGE_MODE: u32 = 0o600;

/// An error while preparing the btrfs root.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// A filesystem operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("creating root directory", "statfs on", ...).
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The root path exists but is not a directory.
    #[error("root {} exists but is not a directory", root.display())]
    RootNotDirectory {
        /// The configured root.
        root: PathBuf,
    },
    /// The root is not on btrfs and the embedded image is disabled.
    #[error(
        "root {} is on {fs_type}, not btrfs, and the embedded image is disabled; either \
         put the root on a btrfs filesystem (set `root` or --root to a directory on \
         btrfs) or set `embedded.enabled = true` to let cowsnap mount a btrfs image \
         file on it",
        root.display()
    )]
    NotBtrfs {
        /// The configured root.
        root: PathBuf,
        /// The filesystem the root is on, as the kernel names it.
        fs_type: String,
    },
    /// The root has content, and mounting the image on it would hide that
    /// content.
    #[error(
        "root {} is not on btrfs and is not empty; cowsnap will not mount its btrfs \
         image {} over it because that would hide the existing files; empty it, move \
         it away, or choose another root",
        root.display(),
        image.display()
    )]
    RootNotEmpty {
        /// The configured root.
        root: PathBuf,
        /// The image that would have been mounted.
        image: PathBuf,
    },
    /// The image file exists but does not hold a btrfs filesystem; cowsnap
    /// never formats an existing file.
    #[error(
        "image {} exists but is not a btrfs image (no btrfs superblock at offset \
         0x10040); cowsnap will not format an existing file; remove it or set \
         `embedded.image` to another path",
        image.display()
    )]
    ImageNotBtrfs {
        /// The configured image.
        image: PathBuf,
    },
    /// The image path cannot be used as an image file.
    #[error("image {}: {reason}", image.display())]
    ImageUnusable {
        /// The configured image.
        image: PathBuf,
        /// Why not.
        reason: String,
    },
    /// An external command could not be started at all.
    #[error("cannot run `{command}`: {source}{hint}")]
    CommandNotStarted {
        /// The command line.
        command: String,
        /// The spawn error.
        #[source]
        source: io::Error,
        /// What to install if the program is missing, or nothing.
        hint: &'static str,
    },
    /// An external command exited with a failure.
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr (or its stdout if stderr was empty), trimmed.
        output: String,
    },
}

/// What [`ensure_btrfs_root`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSetup {
    /// The root was already on btrfs; nothing was mounted.
    AlreadyBtrfs,
    /// An image from an earlier run was mounted on the root.
    MountedExisting {
        /// The image file.
        image: PathBuf,
    },
    /// A new image was created, formatted and mounted on the root.
    CreatedAndMounted {
        /// The image file.
        image: PathBuf,
        /// Its apparent size in bytes (it is sparse).
        size: u64,
    },
}

/// A root directory that is on btrfs, possibly because this process mounted
/// the embedded image on it. Call [`EmbeddedRoot::release`] at shutdown;
/// dropping it without that leaves the mount in place, which is harmless:
/// the next start finds the root on btrfs and uses it as it is.
#[derive(Debug)]
#[must_use = "call release() at shutdown to unmount an image this process mounted"]
pub struct EmbeddedRoot {
    /// The root, canonicalized (it is what the mount table shows).
    root: PathBuf,
    /// The image mounted on the root, if this process mounted one.
    image: Option<PathBuf>,
    /// The loop device behind the mount, if this process mounted the image
    /// and the mount table names it.
    loop_device: Option<PathBuf>,
}

impl EmbeddedRoot {
    /// The root directory, canonicalized.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image this process mounted on the root, if it mounted one.
    pub fn image(&self) -> Option<&Path> {
        self.image.as_deref()
    }

    /// The loop device this process mounted the image through, if known.
    pub fn loop_device(&self) -> Option<&Path> {
        self.loop_device.as_deref()
    }

    /// Whether this process mounted the image on the root (and so
    /// [`EmbeddedRoot::release`] will unmount it).
    pub fn mounted_by_us(&self) -> bool {
        self.image.is_some()
    }

    /// Unmounts the image if this process mounted it. The unmount is not
    /// lazy: if the filesystem is busy (a container still uses a snapshot, a
    /// shell sits in the root), a lazy unmount would detach the root from
    /// the tree while the data stays in use invisibly, so instead a warning
    /// is logged and the mount stays; the next start finds the root on btrfs
    /// and reuses it. The loop device was set up with autoclear by `mount`,
    /// so the kernel frees it with the last unmount.
    pub fn release(self) {
        let Some(image) = &self.image else {
            return;
        };
        match umount2(&self.root, MntFlags::empty()) {
            Ok(()) => info!(
                root = %self.root.display(),
                image = %image.display(),
                loop_device = %display_opt(&self.loop_device),
                "unmounted embedded btrfs image"
            ),
            Err(Errno::EBUSY) => warn!(
                root = %self.root.display(),
                image = %image.display(),
                "embedded btrfs image is busy; leaving it mounted (the next start reuses it)"
            ),
            Err(err) => warn!(
                root = %self.root.display(),
                image = %image.display(),
                error = %err,
                "could not unmount embedded btrfs image; leaving it mounted"
            ),
        }
    }
}

/// Whether `path` is on a btrfs filesystem (its `statfs` type is
/// `BTRFS_SUPER_MAGIC`, 0x9123683E).
pub fn is_on_btrfs(path: &Path) -> Result<bool, EmbeddedError> {
    let stat = statfs(path).map_err(|errno| EmbeddedError::Io {
        action: "statfs on",
        path: path.to_owned(),
        source: errno.into(),
    })?;
    Ok(stat.filesystem_type() == BTRFS_SUPER_MAGIC)
}

/// Makes sure `root` exists (created with mode 0700, owned by the caller,
/// if missing) and is on btrfs, mounting the embedded image `image` on it
/// when it is not and `cfg.enabled` is set. `image` is normally
/// [`crate::config::Config::embedded_image_path`]; `cfg.size` is used only
/// when the image is created. See the module documentation for the rules.
pub fn ensure_btrfs_root(
    root: &Path,
    cfg: &EmbeddedConfig,
    image: &Path,
) -> Result<(EmbeddedRoot, RootSetup), EmbeddedError> {
    let created = ensure_root_dir(root)?;
    // The mount table shows canonical paths; compare and mount with those.
    let root = fs::canonicalize(root).map_err(|source| EmbeddedError::Io {
        action: "resolving root",
        path: root.to_owned(),
        source,
    })?;
    if is_on_btrfs(&root)? {
        if !created {
            warn_if_not_private(&root);
        }
        match containing_mount(&root) {
            Some(mount) => info!(
                root = %root.display(),
                mount_point = %mount.mount_point.display(),
                source = %mount.source,
                "root is on btrfs; using it as it is"
            ),
            None => info!(root = %root.display(), "root is on btrfs; using it as it is"),
        }
        let embedded = EmbeddedRoot {
            root,
            image: None,
            loop_device: None,
        };
        return Ok((embedded, RootSetup::AlreadyBtrfs));
    }

    if !cfg.enabled {
        let fs_type = containing_mount(&root)
            .map(|mount| mount.fs_type)
            .unwrap_or_else(|| "a filesystem other than btrfs".to_owned());
        return Err(EmbeddedError::NotBtrfs { root, fs_type });
    }
    // Checked before anything is created, so refusing leaves no image behind.
    if !dir_is_empty(&root)? {
        return Err(EmbeddedError::RootNotEmpty {
            root,
            image: image.to_owned(),
        });
    }

    let (image, new_image) = match prepare_image(image, &root, cfg.size.bytes())? {
        PreparedImage::Existing(image) => (image, None),
        PreparedImage::Created(guard) => (guard.path.clone(), Some(guard)),
    };

    mount_image(&image, &root)?;
    // From here on the image is mounted; undo the mount if the root cannot
    // be made private, rather than serve from a world-readable root.
    if let Err(err) = make_private(&root) {
        if let Err(errno) = umount2(&root, MntFlags::empty()) {
            warn!(root = %root.display(), error = %errno, "could not unmount after failure");
        }
        return Err(err);
    }
    let loop_device = mount_source(&root).map(PathBuf::from);
    let image_len = fs::metadata(&image).map(|m| m.len()).unwrap_or(0);

    let setup = match new_image {
        Some(guard) => {
            guard.keep();
            info!(
                image = %image.display(),
                root = %root.display(),
                loop_device = %display_opt(&loop_device),
                size = %crate::config::ByteSize(image_len),
                "mounted new embedded btrfs image on root (root is not on btrfs)"
            );
            RootSetup::CreatedAndMounted {
                image: image.clone(),
                size: image_len,
            }
        }
        None => {
            info!(
                image = %image.display(),
                root = %root.display(),
                loop_device = %display_opt(&loop_device),
                size = %crate::config::ByteSize(image_len),
                "mounted existing embedded btrfs image on root (root is not on btrfs)"
            );
            RootSetup::MountedExisting {
                image: image.clone(),
            }
        }
    };
    let embedded = EmbeddedRoot {
        root,
        image: Some(image),
        loop_device,
    };
    Ok((embedded, setup))
}

/// Creates the root with mode 0700 if it is missing; returns whether it did.
fn ensure_root_dir(root: &Path) -> Result<bool, EmbeddedError> {
    match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => return Ok(false),
        Ok(_) => {
            return Err(EmbeddedError::RootNotDirectory {
                root: root.to_owned(),
            });
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EmbeddedError::Io {
                action: "inspecting root",
                path: root.to_owned(),
                source,
            });
        }
    }
    // Missing parents get 0700 as well: they are cowsnap's own directories
    // (nothing else asked for them) and there is no reason to open them up.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(ROOT_MODE)
        .create(root)
        .map_err(|source| EmbeddedError::Io {
            action: "creating root directory",
            path: root.to_owned(),
            source,
        })?;
    // The umask may have removed owner bits from the requested mode.
    set_mode(root, ROOT_MODE)?;
    info!(root = %root.display(), "created root directory (mode 0700)");
    Ok(true)
}

/// Logs a warning if an existing root is reachable by other users: cowsnap
/// does not change the mode of a directory it did not create, but the
/// operator should know.
fn warn_if_not_private(root: &Path) {
    if let Ok(meta) = fs::metadata(root) {
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            warn!(
                root = %root.display(),
                mode = %format!("{mode:04o}"),
                "root is accessible to other users; 0700 is recommended"
            );
        }
    }
}

/// Makes the root of a freshly mounted image private to the caller:
/// `mkfs.btrfs` creates the top directory 0755 and owned by whoever ran it.
fn make_private(root: &Path) -> Result<(), EmbeddedError> {
    // SAFETY: geteuid and getegid take no arguments, touch no memory of
    // ours and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    std::os::unix::fs::chown(root, Some(uid), Some(gid)).map_err(|source| EmbeddedError::Io {
        action: "changing owner of",
        path: root.to_owned(),
        source,
    })?;
    set_mode(root, ROOT_MODE)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), EmbeddedError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        EmbeddedError::Io {
            action: "changing mode of",
            path: path.to_owned(),
            source,
        }
    })
}

fn dir_is_empty(dir: &Path) -> Result<bool, EmbeddedError> {
    let mut entries = fs::read_dir(dir).map_err(|source| EmbeddedError::Io {
        action: "listing root",
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries.next().is_none())
}

/// An image ready to be mounted.
enum PreparedImage {
    /// An image from an earlier run, checked to hold btrfs.
    Existing(PathBuf),
    /// An image created and formatted by this call; removed again unless
    /// the mount succeeds.
    Created(RemoveOnDrop),
}

/// Returns the image to mount: the existing one if it holds btrfs, or a new
/// sparse one of `size` bytes, formatted. Refuses anything else.
fn prepare_image(image: &Path, root: &Path, size: u64) -> Result<PreparedImage, EmbeddedError> {
    let unusable = |reason: String| EmbeddedError::ImageUnusable {
        image: image.to_owned(),
        reason,
    };
    match fs::metadata(image) {
        Ok(meta) if meta.is_file() => {
            if !has_btrfs_magic(image)? {
                return Err(EmbeddedError::ImageNotBtrfs {
                    image: image.to_owned(),
                });
            }
            debug!(image = %image.display(), "found existing btrfs image");
            return Ok(PreparedImage::Existing(image.to_owned()));
        }
        Ok(_) => return Err(unusable("exists but is not a regular file".to_owned())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EmbeddedError::Io {
                action: "inspecting image",
                path: image.to_owned(),
                source,
            });
        }
    }

    // An image inside the root would be hidden by its own mount (and the
    // root would no longer be empty on the next start). Checked before any
    // directory is created, so that refusing leaves the root untouched.
    if resolve_existing_prefix(image)?.starts_with(root) {
        return Err(unusable(format!(
            "is inside the root {}, which the image is mounted on; put it beside the root",
            root.display()
        )));
    }
    if let Some(parent) = image.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(ROOT_MODE)
            .create(parent)
            .map_err(|source| EmbeddedError::Io {
                action: "creating directory for image",
                path: parent.to_owned(),
                source,
            })?;
    }

    // create_new: if another process created the file meanwhile, fail
    // instead of formatting a file that is not ours.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(IMAGE_MODE)
        .open(image)
        .map_err(|source| EmbeddedError::Io {
            action: "creating image",
            path: image.to_owned(),
            source,
        })?;
    let guard = RemoveOnDrop {
        path: image.to_owned(),
        armed: true,
    };
    // set_len on a new file only records the size: the blocks stay holes
    // until btrfs writes to them, so a 20 GiB image costs nothing up front.
    file.set_len(size).map_err(|source| EmbeddedError::Io {
        action: "setting size of image",
        path: image.to_owned(),
        source,
    })?;
    drop(file);
    info!(
        image = %image.display(),
        size = %crate::config::ByteSize(size),
        "created sparse image file; formatting it as btrfs"
    );
    run(
        "mkfs.btrfs",
        &[
            "-q".as_ref(),
            "-L".as_ref(),
            IMAGE_LABEL.as_ref(),
            image.as_os_str(),
        ],
        " (is btrfs-progs installed?)",
    )?;
    Ok(PreparedImage::Created(guard))
}

/// `path` made absolute with its longest existing ancestor canonicalized
/// (symlinks resolved) and the missing rest appended as written, so that it
/// can be compared with a canonical path before it exists.
fn resolve_existing_prefix(path: &Path) -> Result<PathBuf, EmbeddedError> {
    let absolute = std::path::absolute(path).map_err(|source| EmbeddedError::Io {
        action: "resolving",
        path: path.to_owned(),
        source,
    })?;
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        match fs::canonicalize(existing) {
            Ok(mut resolved) => {
                resolved.extend(missing.iter().rev());
                return Ok(resolved);
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Ok(absolute);
                };
                missing.push(name);
                existing = parent;
            }
            Err(source) => {
                return Err(EmbeddedError::Io {
                    action: "resolving",
                    path: existing.to_owned(),
                    source,
                });
            }
        }
    }
}

/// Whether the file starts with a btrfs superblock (checks the magic only).
fn has_btrfs_magic(image: &Path) -> Result<bool, EmbeddedError> {
    let io_err = |source| EmbeddedError::Io {
        action: "reading superblock of image",
        path: image.to_owned(),
        source,
    };
    let file = File::open(image).map_err(io_err)?;
    let mut magic = [0u8; 8];
    match file.read_exact_at(&mut magic, BTRFS_MAGIC_OFFSET) {
        Ok(()) => Ok(&magic == BTRFS_MAGIC),
        // Too short to hold a superblock: not btrfs.
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(err) => Err(io_err(err)),
    }
}

/// Mounts the image on the root. util-linux `mount -o loop` finds a free
/// loop device, attaches the file with autoclear (so the last unmount frees
/// the device) and mounts it; `-t btrfs` keeps it from probing for other
/// filesystem types.
fn mount_image(image: &Path, root: &Path) -> Result<(), EmbeddedError> {
    run(
        "mount",
        &[
            "-t".as_ref(),
            "btrfs".as_ref(),
            "-o".as_ref(),
            "loop".as_ref(),
            image.as_os_str(),
            root.as_os_str(),
        ],
        " (is util-linux installed?)",
    )
}

/// Runs a command to completion, turning a failure into an error that
/// carries the command line and what it printed. `missing_hint` is added to
/// the error when the program is not found.
fn run(program: &str, args: &[&OsStr], missing_hint: &'static str) -> Result<(), EmbeddedError> {
    let command_line = {
        let mut line = OsString::from(program);
        for arg in args {
            line.push(" ");
            line.push(arg);
        }
        line.to_string_lossy().into_owned()
    };
    debug!(command = %command_line, "running");
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| EmbeddedError::CommandNotStarted {
            hint: if source.kind() == io::ErrorKind::NotFound {
                missing_hint
            } else {
                ""
            },
            command: command_line.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let output_text = if stderr.is_empty() {
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    } else {
        stderr
    };
    Err(EmbeddedError::CommandFailed {
        command: command_line,
        status: output.status,
        output: output_text,
    })
}

/// Removes a file on drop unless disarmed with [`RemoveOnDrop::keep`]; this
/// is how an image created by a failing call disappears again, whichever
/// step fails.
struct RemoveOnDrop {
    path: PathBuf,
    armed: bool,
}

impl RemoveOnDrop {
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => {
                info!(image = %self.path.display(), "removed the image created by this failed attempt")
            }
            Err(err) => warn!(
                image = %self.path.display(),
                error = %err,
                "could not remove the image created by this failed attempt"
            ),
        }
    }
}

/// One line of `/proc/self/mountinfo`, the fields cowsnap needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mount_point: PathBuf,
    fs_type: String,
    source: String,
}

/// Parses `/proc/self/mountinfo` (see proc(5)); unreadable means empty,
/// because the mount table only improves log messages here.
fn mount_table() -> Vec<MountEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|text| text.lines().filter_map(parse_mountinfo_line).collect())
        .unwrap_or_default()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw` ->
/// mount point `/mnt2`, type `ext3`, source `/dev/root`. The optional fields
/// end at the lone `-`.
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    Some(MountEntry {
        mount_point: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
        fs_type: unescape_mountinfo(fields.get(separator + 1)?),
        source: unescape_mountinfo(fields.get(separator + 2)?),
    })
}

/// The kernel escapes space, tab, newline and backslash in mountinfo as
/// `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(value) = bytes.get(i + 1..i + 4).and_then(octal_byte)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Three octal digits as a byte, or None if they are not (or overflow).
fn octal_byte(digits: &[u8]) -> Option<u8> {
    digits.iter().try_fold(0u8, |value, &digit| match digit {
        b'0'..=b'7' => value.checked_mul(8)?.checked_add(digit - b'0'),
        _ => None,
    })
}

/// The mount `path` is on: the one with the longest mount point containing
/// it, the last one listed if several share it (later mounts cover earlier
/// ones).
fn containing_mount(path: &Path) -> Option<MountEntry> {
    mount_table()
        .into_iter()
        .filter(|entry| path.starts_with(&entry.mount_point))
        .max_by_key(|entry| entry.mount_point.components().count())
}

/// The source (for a loop mount, the loop device) of the topmost mount on
/// exactly `mount_point`.
fn mount_source(mount_point: &Path) -> Option<String> {
    mount_table()
        .into_iter()
        .rev()
        .find(|entry| entry.mount_point == mount_point)
        .map(|entry| entry.source)
}

fn display_opt(path: &Option<PathBuf>) -> String {
    path.as_deref()
        .map_or_else(|| "unknown".to_owned(), |p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MIB: u64 = 1 << 20;
    /// Small enough to be quick, large enough for mkfs.btrfs.
    const TEST_IMAGE_SIZE: u64 = 300 * MIB;

    fn init_logging() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_max_level(tracing::Level::DEBUG)
            .try_init();
    }

    fn enabled() -> EmbeddedConfig {
        EmbeddedConfig {
            enabled: true,
            image: None,
            size: ByteSize(TEST_IMAGE_SIZE),
        }
    }

    /// A directory under /var/tmp (disk-backed and not btrfs on the test
    /// hosts, so the embedded path is taken) that unmounts everything
    /// mounted below it and removes itself on drop, also when the test
    /// panics.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> TestDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let dir = PathBuf::from(format!(
                "/var/tmp/cowsnap-embedded-test-{}-{}-{name}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).expect("create test dir");
            let dir = fs::canonicalize(&dir).expect("canonicalize test dir");
            assert!(
                !is_on_btrfs(&dir).expect("statfs test dir"),
                "the embedded tests need {} not to be on btrfs",
                dir.display()
            );
            TestDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            // Deepest (last mounted) first.
            for entry in mount_table().into_iter().rev() {
                if entry.mount_point.starts_with(&self.0)
                    && umount2(&entry.mount_point, MntFlags::empty()).is_err()
                {
                    let _ = umount2(&entry.mount_point, MntFlags::MNT_DETACH);
                }
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn is_mount_point(path: &Path) -> bool {
        mount_table().iter().any(|entry| entry.mount_point == path)
    }

    /// Whether any loop device is still attached to `image`.
    fn loop_device_backing(image: &Path) -> Option<String> {
        let image = image.to_string_lossy();
        fs::read_dir("/sys/block")
            .ok()?
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("loop"))
            .find_map(|entry| {
                let backing = fs::read_to_string(entry.path().join("loop/backing_file")).ok()?;
                (backing.trim() == image).then(|| entry.file_name().to_string_lossy().into_owned())
            })
    }

    #[test]
    fn creates_mounts_and_reuses_image_after_release() {
        init_logging();
        let dir = TestDir::new("reuse");
        let root = dir.path("state/root");
        let image = dir.path("state/root.img");

        let (embedded, setup) = ensure_btrfs_root(&root, &enabled(), &image).expect("ensure");
        assert_eq!(
            setup,
            RootSetup::CreatedAndMounted {
                image: image.clone(),
                size: TEST_IMAGE_SIZE
            }
        );
        assert!(embedded.mounted_by_us());
        assert!(is_mount_point(&root));
        assert!(is_on_btrfs(&root).expect("statfs"));
        let loop_device = embedded.loop_device().expect("loop device").to_owned();
        assert!(
            loop_device.to_string_lossy().starts_with("/dev/loop"),
            "{}",
            loop_device.display()
        );
        // Sparse: far less is allocated than the apparent size.
        let meta = fs::metadata(&image).expect("image metadata");
        assert_eq!(meta.len(), TEST_IMAGE_SIZE);
        assert!(
            meta.blocks() * 512 < TEST_IMAGE_SIZE / 2,
            "{} blocks",
            meta.blocks()
        );

        fs::write(root.join("marker"), b"kept").expect("write marker");
        embedded.release();
        assert!(!is_mount_point(&root), "release unmounts");
        assert!(!root.join("marker").exists());
        assert_eq!(
            loop_device_backing(&image),
            None,
            "autoclear freed the loop device"
        );

        let (embedded, setup) = ensure_btrfs_root(&root, &enabled(), &image).expect("re-ensure");
        assert_eq!(
            setup,
            RootSetup::MountedExisting {
                image: image.clone()
            }
        );
        assert_eq!(
            fs::read(root.join("marker")).expect("marker survives"),
            b"kept"
        );
        embedded.release();
        assert!(!is_mount_point(&root));
    }

    #[test]
    fn created_root_and_mounted_root_have_mode_0700() {
        init_logging();
        let dir = TestDir::new("mode");
        let root = dir.path("a/b/root");
        let image = dir.path("a/b/root.img");
        let (embedded, _) = ensure_btrfs_root(&root, &enabled(), &image).expect("ensure");
        let mode = |path: &Path| fs::metadata(path).expect("metadata").mode() & 0o7777;
        assert_eq!(mode(&root), 0o700, "mounted root");
        assert_eq!(mode(&dir.path("a")), 0o700, "created parent");
        assert_eq!(mode(&image) & 0o077, 0, "image is private");
        embedded.release();
        assert_eq!(mode(&root), 0o700, "created root under the mount");
    }

    #[test]
    fn root_inside_btrfs_mount_is_used_as_is() {
        init_logging();
        let dir = TestDir::new("already");
        let mnt = dir.path("mnt");
        let (outer, _) =
            ensure_btrfs_root(&mnt, &enabled(), &dir.path("mnt.img")).expect("outer mount");

        let root = mnt.join("nested/root");
        let image = dir.path("nested.img");
        let (embedded, setup) = ensure_btrfs_root(&root, &enabled(), &image).expect("ensure");
        assert_eq!(setup, RootSetup::AlreadyBtrfs);
        assert!(!embedded.mounted_by_us());
        assert!(root.is_dir());
        assert!(!image.exists(), "no image is created for a btrfs root");
        embedded.release();
        assert!(
            is_mount_point(&mnt),
            "release of AlreadyBtrfs unmounts nothing"
        );
        outer.release();
    }

    #[test]
    fn existing_non_btrfs_image_is_refused_untouched() {
        init_logging();
        let dir = TestDir::new("not-btrfs-image");
        let root = dir.path("root");
        let image = dir.path("root.img");
        let junk = vec![0x5a_u8; 2 * MIB as usize];
        fs::write(&image, &junk).expect("write junk image");

        let err = ensure_btrfs_root(&root, &enabled(), &image).expect_err("must refuse");
        assert!(
            matches!(err, EmbeddedError::ImageNotBtrfs { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("will not format"), "{err}");
        assert_eq!(fs::read(&image).expect("image still there"), junk);
        assert!(!is_mount_point(&root));
    }

    #[test]
    fn short_existing_image_is_refused() {
        init_logging();
        let dir = TestDir::new("short-image");
        let image = dir.path("root.img");
        fs::write(&image, b"tiny").expect("write");
        let err = ensure_btrfs_root(&dir.path("root"), &enabled(), &image).expect_err("refuse");
        assert!(
            matches!(err, EmbeddedError::ImageNotBtrfs { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn non_empty_root_is_refused_before_creating_an_image() {
        init_logging();
        let dir = TestDir::new("non-empty");
        let root = dir.path("root");
        let image = dir.path("root.img");
        fs::create_dir(&root).expect("mkdir root");
        fs::write(root.join("precious"), b"data").expect("write");

        let err = ensure_btrfs_root(&root, &enabled(), &image).expect_err("must refuse");
        assert!(matches!(err, EmbeddedError::RootNotEmpty { .. }), "{err:?}");
        assert!(err.to_string().contains("hide the existing files"), "{err}");
        assert!(!image.exists(), "nothing was created");
        assert!(!is_mount_point(&root));
        assert_eq!(fs::read(root.join("precious")).expect("data"), b"data");
    }

    #[test]
    fn disabled_embedded_image_on_non_btrfs_root_is_an_error() {
        init_logging();
        let dir = TestDir::new("disabled");
        let root = dir.path("root");
        let image = dir.path("root.img");
        let cfg = EmbeddedConfig {
            enabled: false,
            ..enabled()
        };
        let err = ensure_btrfs_root(&root, &cfg, &image).expect_err("must fail");
        let message = err.to_string();
        assert!(matches!(err, EmbeddedError::NotBtrfs { .. }), "{err:?}");
        assert!(message.contains("not btrfs"), "{message}");
        assert!(message.contains("embedded.enabled = true"), "{message}");
        assert!(message.contains("on a btrfs filesystem"), "{message}");
        assert!(!image.exists());
        assert!(!is_mount_point(&root));
    }

    #[test]
    fn failed_mkfs_removes_the_image_it_created() {
        init_logging();
        let dir = TestDir::new("mkfs-fails");
        let root = dir.path("root");
        let image = dir.path("root.img");
        // Far below what mkfs.btrfs accepts.
        let cfg = EmbeddedConfig {
            size: ByteSize(MIB),
            ..enabled()
        };
        let err = ensure_btrfs_root(&root, &cfg, &image).expect_err("mkfs must fail");
        match &err {
            EmbeddedError::CommandFailed {
                command, output, ..
            } => {
                assert!(
                    command.starts_with("mkfs.btrfs -q -L cowsnap "),
                    "{command}"
                );
                assert!(command.ends_with("root.img"), "{command}");
                assert!(!output.is_empty(), "stderr is carried");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(!image.exists(), "the half-made image is gone");
        assert!(!is_mount_point(&root));
    }

    #[test]
    fn created_image_is_removed_unless_kept() {
        // The mechanism that removes a new image when any later step (mkfs
        // above, mount or chmod here) fails.
        init_logging();
        let dir = TestDir::new("guard");
        let root = dir.path("root");
        fs::create_dir(&root).expect("mkdir");
        let image = dir.path("root.img");
        let prepared = prepare_image(&image, &root, TEST_IMAGE_SIZE).expect("prepare");
        assert!(has_btrfs_magic(&image).expect("read magic"), "mkfs ran");
        drop(prepared);
        assert!(!image.exists(), "the guard removed the image");
    }

    #[test]
    fn busy_image_stays_mounted_on_release() {
        init_logging();
        let dir = TestDir::new("busy");
        let root = dir.path("root");
        let image = dir.path("root.img");
        let (embedded, _) = ensure_btrfs_root(&root, &enabled(), &image).expect("ensure");
        let open = File::create(root.join("held-open")).expect("open file on the mount");
        embedded.release();
        assert!(is_mount_point(&root), "busy mount is left in place");
        drop(open);

        // The next start finds the root on btrfs and uses it.
        let (embedded, setup) = ensure_btrfs_root(&root, &enabled(), &image).expect("ensure");
        assert_eq!(setup, RootSetup::AlreadyBtrfs);
        embedded.release();
        // TestDir unmounts it.
    }

    #[test]
    fn root_that_is_a_file_is_refused() {
        let dir = TestDir::new("root-file");
        let root = dir.path("root");
        fs::write(&root, b"").expect("write");
        let err = ensure_btrfs_root(&root, &enabled(), &dir.path("root.img")).expect_err("refuse");
        assert!(
            matches!(err, EmbeddedError::RootNotDirectory { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn image_inside_root_is_refused() {
        let dir = TestDir::new("image-inside");
        let root = dir.path("root");
        let err =
            ensure_btrfs_root(&root, &enabled(), &root.join("sub/root.img")).expect_err("refuse");
        assert!(
            matches!(err, EmbeddedError::ImageUnusable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("inside the root"), "{err}");
        assert!(
            dir_is_empty(&root).expect("list root"),
            "nothing was created in the root"
        );
    }

    #[test]
    fn is_on_btrfs_reports_missing_path_with_context() {
        let err = is_on_btrfs(Path::new("/nonexistent/cowsnap")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/cowsnap"), "{err}");
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let line = "43 27 0:39 / /var/tmp/my\\040root rw,relatime shared:1 master:2 - btrfs \
                    /dev/loop0 rw,space_cache=v2";
        assert_eq!(
            parse_mountinfo_line(line),
            Some(MountEntry {
                mount_point: PathBuf::from("/var/tmp/my root"),
                fs_type: "btrfs".to_owned(),
                source: "/dev/loop0".to_owned(),
            })
        );
        assert_eq!(parse_mountinfo_line("garbage"), None);
        assert_eq!(unescape_mountinfo("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_mountinfo("trailing\\"), "trailing\\");
        assert_eq!(unescape_mountinfo("short\\04"), "short\\04");
    }
}
