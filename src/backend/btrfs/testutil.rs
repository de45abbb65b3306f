//! Test fixture: a real btrfs filesystem on a loop-mounted sparse image file.
//!
//! btrfs behaviour (snapshots, quotas, read-only flags) cannot be faked credibly, so tests
//! that touch the backend run against a throwaway filesystem. Creating one needs root
//! (mount) and `mkfs.btrfs` (btrfs-progs). Only std is used so the module can move
//! anywhere in the crate.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A freshly made btrfs filesystem mounted on a temporary directory, gone again on drop.
///
/// Layout: `<parent>/cowsnap-btrfs.<pid>.<n>.<nanos>/{btrfs.img, mnt/}`. Drop unmounts
/// (retrying, then lazily if something still holds the mount), removes the image and the
/// directories; it runs on panic unwinding too, so a failing test does not leak mounts.
/// Cleanup never removes anything recursively, so a mount that could not be detached is
/// left alone rather than emptied.
#[derive(Debug)]
pub struct LoopBtrfs {
    root: PathBuf,
    image: PathBuf,
    mount: PathBuf,
    mounted: bool,
}

/// Distinguishes fixtures made by one process in the same nanosecond.
static FIXTURE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LoopBtrfs {
    /// Image size used by [`LoopBtrfs::new`]: 2 GiB, sparse, so it costs only what is
    /// written.
    pub const DEFAULT_SIZE: u64 = 2 << 30;

    /// Where [`LoopBtrfs::new`] puts the image: /var/tmp is on disk (not tmpfs) on most
    /// systems, so large tests do not eat memory.
    pub const DEFAULT_PARENT: &'static str = "/var/tmp";

    /// A 2 GiB filesystem under /var/tmp.
    pub fn new() -> io::Result<Self> {
        Self::new_in(Path::new(Self::DEFAULT_PARENT), Self::DEFAULT_SIZE)
    }

    /// A filesystem of `size` bytes (at least ~120 MiB for mkfs.btrfs) in a new
    /// directory under `parent`.
    pub fn new_in(parent: &Path, size: u64) -> io::Result<Self> {
        let root = create_unique_dir(parent)?;
        let mut fixture = LoopBtrfs {
            image: root.join("btrfs.img"),
            mount: root.join("mnt"),
            root,
            mounted: false,
        };
        // From here on Drop removes whatever was created if a step fails.
        File::create_new(&fixture.image)?.set_len(size)?;
        fs::create_dir(&fixture.mount)?;
        run(Command::new(tool("mkfs.btrfs"))
            .arg("-q")
            .arg(&fixture.image))?;
        run(Command::new(tool("mount"))
            .args(["-o", "loop"])
            .arg(&fixture.image)
            .arg(&fixture.mount))?;
        fixture.mounted = true;
        Ok(fixture)
    }

    /// The mount point: the filesystem's top-level subvolume (id 5).
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The image file backing the loop device.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Opens the mount point, e.g. as the `fs` argument of the ioctl wrappers.
    pub fn open_root(&self) -> io::Result<File> {
        File::open(&self.mount)
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        if self.mounted && !unmount(&self.mount) {
            eprintln!(
                "LoopBtrfs: could not unmount {}; leaving {} in place",
                self.mount.display(),
                self.root.display()
            );
            return;
        }
        for result in [
            fs::remove_file(&self.image),
            fs::remove_dir(&self.mount),
            fs::remove_dir(&self.root),
        ] {
            if let Err(e) = result
                && e.kind() != io::ErrorKind::NotFound
            {
                eprintln!("LoopBtrfs: cleanup of {}: {e}", self.root.display());
            }
        }
    }
}

/// Unmounts `mount`: a few plain attempts (a test's open files or a just-finished
/// process may hold it for a moment), then a lazy unmount that detaches it now and frees
/// the loop device once the last user is gone. Returns whether it is detached.
fn unmount(mount: &Path) -> bool {
    const ATTEMPTS: u32 = 5;
    for attempt in 1..=ATTEMPTS {
        match run(Command::new(tool("umount")).arg(mount)) {
            Ok(()) => return true,
            Err(_) if attempt < ATTEMPTS => {
                thread::sleep(Duration::from_millis(100 * u64::from(attempt)))
            }
            Err(e) => eprintln!("LoopBtrfs: umount {}: {e}; trying lazy", mount.display()),
        }
    }
    match run(Command::new(tool("umount")).arg("-l").arg(mount)) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("LoopBtrfs: umount -l {}: {e}", mount.display());
            false
        }
    }
}

/// Creates a directory under `parent` whose name no other fixture uses.
fn create_unique_dir(parent: &Path) -> io::Result<PathBuf> {
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = FIXTURE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("cowsnap-btrfs.{}.{n}.{nanos}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

/// Path of an admin tool: found through PATH when it is there, else in the sbin
/// directories that a non-login root shell (or CI) may lack in PATH.
fn tool(name: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()));
    if !in_path {
        for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
            let candidate = Path::new(dir).join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// Runs `cmd`, turning a failure exit into an error that carries its stderr.
fn run(cmd: &mut Command) -> io::Result<()> {
    let output = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running {:?}: {e}", cmd.get_program())))?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{:?} {:?} failed ({}): {}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}
