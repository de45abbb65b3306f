//! Test fixture: a scratch dataset on a real ZFS pool, and mounts of
//! cowsnap's datasets.
//!
//! ZFS behaviour (clones, `written`, refusing to destroy a snapshot with
//! clones) cannot be faked credibly, so backend tests need a pool. The pool
//! is named by `COWSNAP_TEST_ZPOOL` (hack/vm-test makes one in its guest);
//! without it the fixture makes a pool on a sparse file when the host has
//! ZFS (`/dev/zfs`), and otherwise reports that ZFS tests cannot run here.
//! Everything made is destroyed on drop, also when a test panics.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::cmd::find_program;

/// The environment variable naming an existing pool for tests.
pub const POOL_ENV: &str = "COWSNAP_TEST_ZPOOL";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A dataset `<pool>/cowsnap-test-<pid>-<n>-<nanos>` (mountpoint=none),
/// destroyed recursively on drop after unmounting anything mounted from it.
#[derive(Debug)]
pub struct ZfsScratch {
    dataset: String,
    /// A pool the fixture made on a file: (pool name, directory holding
    /// the file), destroyed after the dataset.
    own_pool: Option<(String, PathBuf)>,
}

impl ZfsScratch {
    /// A scratch dataset, or `None` when this host cannot run ZFS tests
    /// (no `COWSNAP_TEST_ZPOOL` and no `/dev/zfs`).
    pub fn new() -> io::Result<Option<Self>> {
        let unique = unique_suffix();
        let (pool, own_pool) = match std::env::var(POOL_ENV) {
            Ok(pool) if !pool.is_empty() => (pool, None),
            _ if Path::new("/dev/zfs").exists() => {
                let dir = PathBuf::from(format!("/var/tmp/cowsnap-zpool-{unique}"));
                fs::create_dir_all(&dir)?;
                let file = dir.join("pool.img");
                fs::File::create_new(&file)?.set_len(2 << 30)?;
                let name = format!("cowsnaptest{}", unique.replace('-', ""));
                let made = zpool(&[
                    "create",
                    "-f",
                    "-O",
                    "mountpoint=none",
                    &name,
                    &file.to_string_lossy(),
                ]);
                if let Err(e) = made {
                    let _ = fs::remove_dir_all(&dir);
                    return Err(e);
                }
                (name.clone(), Some((name, dir)))
            }
            _ => return Ok(None),
        };
        let mut scratch = ZfsScratch {
            dataset: format!("{pool}/cowsnap-test-{unique}"),
            own_pool,
        };
        if let Err(e) = zfs(&["create", "-o", "mountpoint=none", &scratch.dataset]) {
            // Nothing to destroy but the pool, if we made one.
            scratch.dataset.clear();
            return Err(e);
        }
        Ok(Some(scratch))
    }

    /// The scratch dataset's name.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }
}

impl Drop for ZfsScratch {
    fn drop(&mut self) {
        if !self.dataset.is_empty() {
            unmount_below(&self.dataset);
            if let Err(e) = zfs(&["destroy", "-r", "-f", &self.dataset]) {
                eprintln!("ZfsScratch: {e}");
            }
        }
        if let Some((pool, dir)) = self.own_pool.take() {
            if let Err(e) = zpool(&["destroy", "-f", &pool]) {
                eprintln!("ZfsScratch: {e}; leaving {}", dir.display());
                return;
            }
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// A dataset mounted on a fresh directory, unmounted (and the directory
/// removed) on drop.
#[derive(Debug)]
pub struct ZfsMount {
    dir: PathBuf,
}

impl ZfsMount {
    /// Mounts `dataset` (read-only if `readonly`) as containerd would: the
    /// mount(2) system call with type "zfs" and the dataset as source.
    pub fn new(dataset: &str, readonly: bool) -> io::Result<Self> {
        let dir = PathBuf::from(format!("/var/tmp/cowsnap-zfs-mnt-{}", unique_suffix()));
        fs::create_dir_all(&dir)?;
        let flags = if readonly {
            nix::mount::MsFlags::MS_RDONLY
        } else {
            nix::mount::MsFlags::empty()
        };
        if let Err(e) = nix::mount::mount(Some(dataset), &dir, Some("zfs"), flags, None::<&str>) {
            let _ = fs::remove_dir(&dir);
            return Err(io::Error::other(format!(
                "mount -t zfs {dataset} {}: {e}",
                dir.display()
            )));
        }
        Ok(ZfsMount { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ZfsMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount(&self.dir) {
            eprintln!(
                "ZfsMount: umount {}: {e}; detaching lazily",
                self.dir.display()
            );
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Unmounts every zfs mount (in this mount namespace) whose source is
/// `dataset` or below it, deepest mount point first.
pub fn unmount_below(dataset: &str) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let below = format!("{dataset}/");
    let mut targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (src, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "zfs" && (src == dataset || src.starts_with(&below)))
                .then(|| unescape_mount_path(target))
        })
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        if nix::mount::umount(t.as_str()).is_err() {
            let _ = nix::mount::umount2(t.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// /proc/self/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Runs `zfs ARGS` (test helper: fails with its stderr).
pub fn zfs(args: &[&str]) -> io::Result<String> {
    run("zfs", args)
}

/// Runs `zpool ARGS` (test helper: fails with its stderr).
pub fn zpool(args: &[&str]) -> io::Result<String> {
    run("zpool", args)
}

fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(find_program(program))
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running {program}: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(io::Error::other(format!(
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}-{nanos}", std::process::id())
}
