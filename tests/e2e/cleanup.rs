//! Removing what an end-to-end run leaves on the host, found from the run's
//! temp dir and containerd namespace alone (no handles needed), so that the
//! same code cleans up after a finished run, a panic, a signal, or a run
//! that was killed outright (the next run removes the dirs of dead runs
//! first): processes whose command line, working dir or root is under the
//! dir, containers in the namespace's cgroups, mounts under the dir, loop
//! devices backed by a file under it, and what containerd 1.6 puts in
//! /run/containerd whatever its config says.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where temp dirs go (on disk, not tmpfs) and their name prefix.
const PARENT: &str = "/var/tmp";
const PREFIX: &str = "cowsnap-e2e.";
/// containerd's fixed state dir: shims put their sockets in `s/` whatever
/// the configured state dir is.
const CONTAINERD_RUN: &str = "/run/containerd";

/// Removes a run: the containers in namespace `ns`, everything under
/// `dir` (`fs`, the run's btrfs fixture, is unmounted by its own drop), the
/// namespace's cgroups, and what appeared in /run/containerd since
/// `run_before`. Returns what it could not remove.
pub fn remove_run(
    dir: &Path,
    ns: &str,
    fs: Option<LoopBtrfs>,
    run_before: Option<&RunContainerd>,
) -> Vec<String> {
    kill_cgroup_processes(ns);
    let mut problems = clean_dir(dir, fs);
    problems.extend(remove_cgroups(ns));
    if let Some(r) = run_before {
        problems.extend(r.restore());
    }
    problems
}

/// Reaps every exited child (the shims this subreaper inherited; the
/// daemons' own handles were waited for before).
pub fn reap_children() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Creates `/var/tmp/cowsnap-e2e.<pid>.<nanos>`.
pub fn create_run_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = Path::new(PARENT).join(format!("{PREFIX}{}.{nanos}", std::process::id()));
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Temp dirs of earlier runs whose process is gone, with that process's id.
pub fn stale_runs() -> Vec<(PathBuf, u32)> {
    let Ok(entries) = fs::read_dir(PARENT) else {
        return vec![];
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = name.strip_prefix(PREFIX)?.split('.').next()?.parse().ok()?;
            // Alive: the pid exists and is still an e2e test binary (not a
            // reused pid).
            let alive = fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(3).any(|w| w == b"e2e"));
            (!alive).then(|| (e.path(), pid))
        })
        .collect()
}

/// Removes everything a run left under `dir`: processes that refer to it,
/// mounts under it (`fs`, the run's btrfs, last), loop devices backed by a
/// file under it, then the dir. Returns what it could not remove.
fn clean_dir(dir: &Path, fs: Option<LoopBtrfs>) -> Vec<String> {
    let mut problems = Vec::new();
    // Containers, shims, runc, containerd, cowsnap: whatever still refers
    // to the dir. SIGKILL: graceful stops were tried before this.
    for round in 0..50 {
        let pids = processes_under(dir);
        if pids.is_empty() {
            break;
        }
        if round == 0 {
            eprintln!("e2e: killing leftover processes {pids:?}");
        }
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(100));
        if round == 49 {
            problems.push(format!("processes still alive: {pids:?}"));
        }
    }
    // Container rootfs mounts live in containerd's state dir; the btrfs
    // mount of `fs` is left to its own Drop, the others go deepest first.
    let keep = fs.as_ref().map(|f| f.path().to_owned());
    for m in mounts_under(dir) {
        if Some(&m) == keep.as_ref() {
            continue;
        }
        if !unmount(&m) {
            problems.push(format!("cannot unmount {}", m.display()));
        }
    }
    drop(fs);
    // A dead run's btrfs has no fixture any more: unmount it here.
    for m in mounts_under(dir) {
        if !unmount(&m) {
            problems.push(format!("cannot unmount {}", m.display()));
        }
    }
    for (dev, file) in loops_under(dir) {
        let detached = Command::new("losetup")
            .arg("-d")
            .arg(&dev)
            .status()
            .is_ok_and(|s| s.success());
        if !detached {
            problems.push(format!("cannot detach {dev} (backed by {file})"));
        }
    }
    if mounts_under(dir).is_empty() {
        if let Err(e) = fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("cannot remove {}: {e}", dir.display()));
        }
    } else {
        problems.push(format!(
            "mounts remain under {}; not removing it",
            dir.display()
        ));
    }
    problems
}

/// Pids of processes whose command line, working dir, root or executable
/// is under `dir` (a container's root is its rootfs mount in the state dir).
fn processes_under(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let p = e.path();
        let in_cmdline =
            fs::read(p.join("cmdline")).is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle));
        let linked = ["cwd", "root", "exe"]
            .iter()
            .any(|l| fs::read_link(p.join(l)).is_ok_and(|t| t.starts_with(dir)));
        if in_cmdline || linked {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points under `dir` (the dir itself included), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    out.dedup();
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unmount(m: &Path) -> bool {
    for attempt in 0..5 {
        if nix::mount::umount(m).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(100 * (attempt + 1)));
    }
    nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH).is_ok()
}

/// Loop devices (`/dev/loopN`, backing file) whose file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<(String, String)> {
    let Ok(out) = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
    else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (dev, file) = l.trim().split_once(char::is_whitespace)?;
            let file = file.trim().trim_end_matches(" (deleted)");
            Path::new(file)
                .starts_with(dir)
                .then(|| (dev.to_owned(), file.to_owned()))
        })
        .collect()
}

/// The namespace's cgroup dirs in every mounted cgroup hierarchy
/// (`<hierarchy>/<namespace>`, the parent of ctr's default cgroup path
/// `/<namespace>/<container>`).
fn namespace_cgroups(namespace: &str) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            // After " - " come the fstype, the source and super options.
            let (left, right) = line.split_once(" - ")?;
            matches!(right.split(' ').next(), Some("cgroup" | "cgroup2")).then_some(())?;
            let top = Path::new(&unescape_mount(left.split(' ').nth(4)?)).join(namespace);
            top.is_dir().then_some(top)
        })
        .collect()
}

/// SIGKILLs every process in the namespace's cgroups: the containers. A
/// container outlives its shim and lives in its own mount namespace (its
/// root reads as "/"), so only its cgroup finds it; while it lives, its
/// mount namespace pins the btrfs and the loop device.
fn kill_cgroup_processes(namespace: &str) {
    let me = std::process::id();
    for round in 0..50 {
        let mut pids = BTreeSet::new();
        for top in namespace_cgroups(namespace) {
            for p in walk(&top).into_iter().chain([top.join("cgroup.procs")]) {
                if p.file_name().is_some_and(|n| n == "cgroup.procs") {
                    let text = fs::read_to_string(&p).unwrap_or_default();
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
                }
            }
        }
        pids.remove(&me);
        if pids.is_empty() {
            return;
        }
        if round == 0 {
            eprintln!("e2e: killing leftover container processes {pids:?}");
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Removes the cgroups runc made for the namespace's containers
/// (`<hierarchy>/<namespace>/<container>`, ctr's default cgroup path) in
/// every mounted cgroup hierarchy: runc removes a container's own group when
/// the container is deleted, never the namespace's, and a killed run leaves
/// both. A group that still has processes is left (rmdir says EBUSY).
fn remove_cgroups(namespace: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for top in namespace_cgroups(namespace) {
        let mut dirs: Vec<PathBuf> = walk(&top)
            .into_iter()
            .filter(|p| p.is_dir())
            .chain([top.clone()])
            .collect();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for d in dirs {
            if let Err(e) = fs::remove_dir(&d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                problems.push(format!("cannot remove cgroup {}: {e}", d.display()));
            }
        }
    }
    problems
}

/// What /run/containerd held before the test: containerd 1.6 always puts
/// shim sockets in /run/containerd/s, and ctr its fifos in
/// /run/containerd/fifo unless told otherwise, whatever the config says.
#[derive(Clone)]
pub struct RunContainerd {
    existed: bool,
    entries: BTreeSet<PathBuf>,
}

impl RunContainerd {
    pub fn snapshot() -> RunContainerd {
        let base = Path::new(CONTAINERD_RUN);
        RunContainerd {
            existed: base.exists(),
            entries: walk(base),
        }
    }

    const FILE: &str = "run-containerd-before";

    /// Records the snapshot in a run's dir, for the cleanup of a run that
    /// was killed before its teardown.
    pub fn save(&self, dir: &Path) {
        let mut text = format!("{}\n", self.existed);
        for p in &self.entries {
            let _ = writeln!(text, "{}", p.display());
        }
        let path = dir.join(Self::FILE);
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    pub fn load(dir: &Path) -> Option<RunContainerd> {
        let text = fs::read_to_string(dir.join(Self::FILE)).ok()?;
        let mut lines = text.lines();
        let existed = lines.next()? == "true";
        Some(RunContainerd {
            existed,
            entries: lines.map(PathBuf::from).collect(),
        })
    }

    /// Removes what appeared since the snapshot: sockets nobody listens on
    /// and empty dirs. Returns what it left.
    pub fn restore(&self) -> Vec<String> {
        let base = Path::new(CONTAINERD_RUN);
        let mut problems = Vec::new();
        let mut new: Vec<PathBuf> = walk(base)
            .into_iter()
            .filter(|p| !self.entries.contains(p))
            .collect();
        new.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in new {
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            let removed = if md.is_dir() {
                fs::remove_dir(&p).is_ok()
            } else if md.file_type().is_socket()
                && std::os::unix::net::UnixStream::connect(&p).is_err()
            {
                fs::remove_file(&p).is_ok()
            } else {
                false
            };
            if !removed {
                problems.push(format!("left {} (appeared during the test)", p.display()));
            }
        }
        if !self.existed && base.exists() && fs::remove_dir(base).is_err() {
            problems.push(format!(
                "cannot remove {CONTAINERD_RUN} (did not exist before)"
            ));
        }
        problems
    }
}

/// Every path under `base` (not following symlinks).
fn walk(base: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![base.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

/// Everything a run could leave behind on the host, for the final check:
/// processes, mounts and loop devices referring to `dir`, `dir` itself, and
/// the cgroups of namespace `ns`.
pub fn leftovers(dir: &Path, ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    let pids = processes_under(dir);
    if !pids.is_empty() {
        out.push(format!("processes {pids:?}"));
    }
    for m in mounts_under(dir) {
        out.push(format!("mount {}", m.display()));
    }
    for (dev, file) in loops_under(dir) {
        out.push(format!("loop device {dev} on {file}"));
    }
    if dir.exists() {
        out.push(format!("directory {}", dir.display()));
    }
    for cg in namespace_cgroups(ns) {
        out.push(format!("cgroup {}", cg.display()));
    }
    out
}
