//! The ioctl wrappers against a real btrfs on a loop device. Needs root and btrfs-progs;
//! run with `cargo test -- --test-threads=2` (each test mounts its own filesystem).
//! The simple-quota cases need kernel 6.7+ and say so where they are skipped (hack/vm-test
//! runs this file on Debian's 6.1, where the full-qgroup cases stand in for them).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use cowsnap::backend::btrfs::ioctl::{self, QuotaMode, SubvolId};
use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use nix::errno::Errno;

const MIB: u64 = 1 << 20;

fn fixture() -> LoopBtrfs {
    LoopBtrfs::new().expect("creating a loop btrfs (needs root and mkfs.btrfs)")
}

fn open(path: &Path) -> File {
    File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn fd(file: &File) -> BorrowedFd<'_> {
    file.as_fd()
}

/// Creates subvolume `parent/name` and returns its path.
fn subvol(parent: &Path, name: &str) -> PathBuf {
    ioctl::create_subvolume(fd(&open(parent)), OsStr::new(name))
        .unwrap_or_else(|e| panic!("create {name} in {}: {e}", parent.display()));
    parent.join(name)
}

fn id_of(path: &Path) -> SubvolId {
    ioctl::subvolume_id(fd(&open(path))).expect("subvolume_id")
}

/// Writes `len` bytes of incompressible-enough data to `path`.
fn write_bytes(path: &Path, len: u64) -> io::Result<()> {
    let mut file = File::create(path)?;
    let mut block = vec![0u8; MIB as usize];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = len;
    while left > 0 {
        for byte in block.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

fn errno_of(e: &io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw)
}

fn sysfs_qgroup(fs: &File, id: SubvolId, field: &str) -> u64 {
    let uuid = ioctl::fs_uuid(fd(fs)).expect("fs_uuid");
    let path = format!(
        "/sys/fs/btrfs/{}/qgroups/0_{}/{field}",
        format_uuid(&uuid),
        id.0
    );
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .expect("sysfs number")
}

fn format_uuid(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn within(value: u64, target: u64, slack: u64) -> bool {
    value + slack >= target && value <= target + slack
}

/// Whether the kernel has btrfs simple quotas (6.7+); when not, says that `test` is
/// skipped, and why.
fn has_simple_quotas(test: &str) -> bool {
    let has = Path::new("/sys/fs/btrfs/features/simple_quota").exists();
    if !has {
        // Straight to stderr: shown in the output of passing runs too.
        let _ = writeln!(
            io::stderr(),
            "skipped {test}: this kernel has no btrfs simple quotas \
             (/sys/fs/btrfs/features/simple_quota is absent; they came in 6.7)"
        );
    }
    has
}

#[test]
fn is_btrfs_distinguishes_filesystems() {
    let fx = fixture();
    assert!(ioctl::is_btrfs(fd(&open(fx.path()))).unwrap());
    for other in ["/dev/shm", "/proc", "/tmp"] {
        let Ok(dir) = File::open(other) else { continue };
        // /tmp may itself be btrfs on some machines; /dev/shm and /proc never are.
        let stat = nix::sys::statfs::fstatfs(fd(&dir)).unwrap();
        let expected = stat.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC;
        assert_eq!(ioctl::is_btrfs(fd(&dir)).unwrap(), expected, "{other}");
        if other != "/tmp" {
            assert!(!ioctl::is_btrfs(fd(&dir)).unwrap(), "{other}");
        }
    }
}

#[test]
fn fs_uuid_names_the_sysfs_directory() {
    let fx = fixture();
    let uuid = ioctl::fs_uuid(fd(&open(fx.path()))).unwrap();
    assert_ne!(uuid, [0; 16]);
    assert!(Path::new(&format!("/sys/fs/btrfs/{}", format_uuid(&uuid))).is_dir());
}

#[test]
fn create_and_snapshot_report_ids_and_readonly() {
    let fx = fixture();
    let root = open(fx.path());
    assert_eq!(ioctl::subvolume_id(fd(&root)).unwrap(), SubvolId::TOP_LEVEL);

    let a = subvol(fx.path(), "a");
    fs::write(a.join("file"), b"hello").unwrap();
    let a_id = id_of(&a);
    assert!(a_id.0 >= 256);
    assert!(!ioctl::is_readonly(fd(&open(&a))).unwrap());

    ioctl::snapshot(fd(&open(&a)), fd(&root), OsStr::new("a-rw"), false).unwrap();
    ioctl::snapshot(fd(&open(&a)), fd(&root), OsStr::new("a-ro"), true).unwrap();
    let rw = fx.path().join("a-rw");
    let ro = fx.path().join("a-ro");
    let (rw_id, ro_id) = (id_of(&rw), id_of(&ro));
    assert!(rw_id != a_id && ro_id != a_id && rw_id != ro_id);
    assert!(!ioctl::is_readonly(fd(&open(&rw))).unwrap());
    assert!(ioctl::is_readonly(fd(&open(&ro))).unwrap());
    assert_eq!(fs::read(ro.join("file")).unwrap(), b"hello");
    // Any file inside a subvolume tells its id; flags need the subvolume root.
    assert_eq!(
        ioctl::subvolume_id(fd(&open(&ro.join("file")))).unwrap(),
        ro_id
    );
    assert_eq!(
        ioctl::is_readonly(fd(&open(&ro.join("file")))).unwrap_err(),
        Errno::EINVAL
    );
    // The snapshot source must be a subvolume root.
    fs::create_dir(a.join("dir")).unwrap();
    assert_eq!(
        ioctl::snapshot(fd(&open(&a.join("dir"))), fd(&root), OsStr::new("x"), false).unwrap_err(),
        Errno::EINVAL
    );
    assert_eq!(
        ioctl::create_subvolume(fd(&root), OsStr::new("a")).unwrap_err(),
        Errno::EEXIST
    );
}

#[test]
fn subvolume_names_are_validated() {
    let fx = fixture();
    let root = open(fx.path());
    for bad in ["", ".", "..", "a/b", "a\0b"] {
        assert_eq!(
            ioctl::create_subvolume(fd(&root), OsStr::new(bad)).unwrap_err(),
            Errno::EINVAL,
            "{bad:?}"
        );
        assert_eq!(
            ioctl::snapshot(fd(&root), fd(&root), OsStr::new(bad), false).unwrap_err(),
            Errno::EINVAL,
            "{bad:?}"
        );
    }
    let longest = "n".repeat(255);
    ioctl::create_subvolume(fd(&root), OsStr::new(&longest)).unwrap();
    assert!(fx.path().join(&longest).is_dir());
    assert_eq!(
        ioctl::create_subvolume(fd(&root), OsStr::new(&"n".repeat(256))).unwrap_err(),
        Errno::ENAMETOOLONG
    );
}

#[test]
fn set_readonly_toggles_and_blocks_writes() {
    let fx = fixture();
    let a = subvol(fx.path(), "a");
    fs::write(a.join("f"), b"x").unwrap();
    let a_dir = open(&a);
    let mut held = OpenOptions::new().append(true).open(a.join("f")).unwrap();

    ioctl::set_readonly(fd(&a_dir), true).unwrap();
    assert!(ioctl::is_readonly(fd(&a_dir)).unwrap());
    ioctl::set_readonly(fd(&a_dir), true).unwrap(); // idempotent

    let err = File::create(a.join("new")).unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::EROFS), "{err}");
    let err = OpenOptions::new()
        .write(true)
        .open(a.join("f"))
        .unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::EROFS), "{err}");
    let err = fs::create_dir(a.join("d")).unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::EROFS), "{err}");
    // A file opened for writing before the flag was set stays writable, and the data
    // lands in the read-only subvolume: the flag is checked when files are opened.
    held.write_all(b"late").unwrap();
    held.sync_all().unwrap();
    assert_eq!(fs::read(a.join("f")).unwrap(), b"xlate");
    let err = ioctl::create_subvolume(fd(&a_dir), OsStr::new("nested")).unwrap_err();
    assert_eq!(err, Errno::EROFS);

    ioctl::set_readonly(fd(&a_dir), false).unwrap();
    assert!(!ioctl::is_readonly(fd(&a_dir)).unwrap());
    fs::write(a.join("new"), b"y").unwrap();
}

#[test]
fn destroy_by_id_removes_subvolume() {
    let fx = fixture();
    let a = subvol(fx.path(), "a");
    let b = subvol(&a, "b");
    fs::write(b.join("f"), b"x").unwrap();
    let (a_id, b_id) = (id_of(&a), id_of(&b));

    // The fd only names the filesystem: a regular file elsewhere on it will do.
    fs::write(fx.path().join("anchor"), b"").unwrap();
    let anchor = open(&fx.path().join("anchor"));
    assert_eq!(
        ioctl::destroy_subvolume(fd(&anchor), a_id).unwrap_err(),
        Errno::ENOTEMPTY,
        "a still holds b"
    );
    // An O_PATH descriptor is refused before btrfs sees the ioctl.
    let o_path = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(fx.path())
        .unwrap();
    assert_eq!(
        ioctl::destroy_subvolume(fd(&o_path), b_id).unwrap_err(),
        Errno::EBADF
    );
    ioctl::destroy_subvolume(fd(&anchor), b_id).unwrap();
    assert!(!b.exists());
    assert_eq!(
        ioctl::destroy_subvolume(fd(&anchor), b_id).unwrap_err(),
        Errno::ENOENT
    );
    // Even an fd inside the subvolume being deleted works.
    let inside = open(&a);
    ioctl::destroy_subvolume(fd(&inside), a_id).unwrap();
    assert!(!a.exists());
    assert_eq!(
        ioctl::destroy_subvolume(fd(&anchor), SubvolId::TOP_LEVEL).unwrap_err(),
        Errno::EINVAL
    );
    assert_eq!(
        ioctl::destroy_subvolume(fd(&anchor), SubvolId(1 << 40)).unwrap_err(),
        Errno::ENOENT
    );
}

#[test]
fn delete_subvolume_tree_removes_nested_subvolumes() {
    let fx = fixture();
    let root = open(fx.path());
    let base = subvol(fx.path(), "base");
    fs::write(base.join("keep"), b"base data").unwrap();
    ioctl::snapshot(fd(&open(&base)), fd(&root), OsStr::new("snap"), false).unwrap();
    let snap = fx.path().join("snap");
    // Two levels of nesting below the snapshot, one in a plain subdirectory, with files.
    fs::create_dir_all(snap.join("var/lib")).unwrap();
    let level1 = subvol(&snap.join("var/lib"), "level1");
    let level2 = subvol(&level1, "level2");
    let sibling = subvol(&snap, "sibling");
    for dir in [&snap, &level1, &level2, &sibling] {
        fs::write(dir.join("data"), b"payload").unwrap();
    }
    let snap_id = id_of(&snap);
    let (l1, l2, sib) = (id_of(&level1), id_of(&level2), id_of(&sibling));

    let mut children = ioctl::child_subvolumes(fd(&root), snap_id).unwrap();
    children.sort();
    let mut expected = vec![l1, sib];
    expected.sort();
    assert_eq!(children, expected);
    assert_eq!(ioctl::child_subvolumes(fd(&root), l1).unwrap(), vec![l2]);

    ioctl::delete_subvolume_tree(fd(&root), snap_id).unwrap();
    assert!(!snap.exists());
    for id in [snap_id, l1, l2, sib] {
        assert_eq!(
            ioctl::destroy_subvolume(fd(&root), id).unwrap_err(),
            Errno::ENOENT,
            "{id} should be gone"
        );
    }
    assert_eq!(
        ioctl::delete_subvolume_tree(fd(&root), snap_id).unwrap_err(),
        Errno::ENOENT
    );
    assert_eq!(fs::read(base.join("keep")).unwrap(), b"base data");
    assert!(
        ioctl::child_subvolumes(fd(&root), SubvolId::TOP_LEVEL)
            .unwrap()
            .contains(&id_of(&base))
    );
}

#[test]
fn nested_subvolume_in_readonly_parent_needs_parent_writable() {
    let fx = fixture();
    let root = open(fx.path());
    let active = subvol(fx.path(), "active");
    let nested = subvol(&active, "nested");
    let nested_id = id_of(&nested);
    let active_id = id_of(&active);
    ioctl::set_readonly(fd(&open(&active)), true).unwrap();

    let err = ioctl::delete_subvolume_tree(fd(&root), active_id).unwrap_err();
    eprintln!("delete tree under read-only parent: {err}");
    assert_eq!(err, Errno::EROFS);
    assert!(nested.exists());

    ioctl::set_readonly(fd(&open(&active)), false).unwrap();
    ioctl::delete_subvolume_tree(fd(&root), active_id).unwrap();
    assert!(!active.exists());
    assert_eq!(
        ioctl::destroy_subvolume(fd(&root), nested_id).unwrap_err(),
        Errno::ENOENT
    );
}

#[test]
fn child_subvolumes_pages_through_many_children() {
    let fx = fixture();
    let root = open(fx.path());
    let parent = subvol(fx.path(), "parent");
    let parent_dir = open(&parent);
    // Long names make each ROOT_REF item bigger, forcing several search calls.
    let mut expected = Vec::new();
    for i in 0..300 {
        let name = format!("child-{i:03}-{}", "x".repeat(200));
        ioctl::create_subvolume(fd(&parent_dir), OsStr::new(&name)).unwrap();
        expected.push(id_of(&parent.join(&name)));
    }
    expected.sort();
    let children = ioctl::child_subvolumes(fd(&root), id_of(&parent)).unwrap();
    assert_eq!(children, expected);
    assert_eq!(
        ioctl::child_subvolumes(fd(&root), SubvolId::TOP_LEVEL).unwrap(),
        vec![id_of(&parent)]
    );
    let start = Instant::now();
    ioctl::delete_subvolume_tree(fd(&root), id_of(&parent)).unwrap();
    eprintln!("deleted a tree of 301 subvolumes in {:?}", start.elapsed());
    assert!(
        ioctl::child_subvolumes(fd(&root), SubvolId::TOP_LEVEL)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn quota_status_is_none_while_quotas_are_off() {
    let fx = fixture();
    let root = open(fx.path());
    let a = subvol(fx.path(), "a");
    assert_eq!(ioctl::quota_status(fd(&root)).unwrap(), None);
    assert_eq!(ioctl::qgroup_info(fd(&root), id_of(&a)).unwrap(), None);
    assert!(ioctl::qgroup_ids(fd(&root)).unwrap().is_empty());
}

#[test]
fn quota_enable_full_reports_full_mode() {
    let fx = fixture();
    let root = open(fx.path());
    let a = subvol(fx.path(), "a");
    ioctl::quota_enable(fd(&root), QuotaMode::Full).unwrap();
    eprintln!(
        "full, right after enable: {:?}",
        ioctl::quota_status(fd(&root)).unwrap()
    );
    ioctl::quota_rescan_wait(fd(&root)).unwrap();
    eprintln!(
        "full, after rescan wait: {:?}",
        ioctl::quota_status(fd(&root)).unwrap()
    );
    ioctl::sync_fs(fd(&root)).unwrap();
    let status = ioctl::quota_status(fd(&root)).unwrap().expect("quotas on");
    eprintln!("full: {status:?}");
    assert!(!status.simple);
    assert!(!status.rescan_running);
    assert!(!status.inconsistent);
    assert_ne!(status.flags & ioctl::QGROUP_STATUS_FLAG_ON, 0);
    assert_eq!(status.version, 1);
    let ids = ioctl::qgroup_ids(fd(&root)).unwrap();
    assert!(ids.contains(&5) && ids.contains(&id_of(&a).0), "{ids:?}");
    // Already on: the kernel accepts a second enable, in any mode it knows, and keeps
    // full mode.
    let again = if has_simple_quotas("the second enable in simple mode") {
        QuotaMode::Simple
    } else {
        QuotaMode::Full
    };
    ioctl::quota_enable(fd(&root), again).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    assert!(!ioctl::quota_status(fd(&root)).unwrap().unwrap().simple);
    // A rescan can be started and waited for.
    ioctl::quota_rescan(fd(&root)).unwrap();
    ioctl::quota_rescan_wait(fd(&root)).unwrap();
}

#[test]
fn quota_enable_simple_reports_simple_mode() {
    if !has_simple_quotas("quota_enable_simple_reports_simple_mode") {
        return;
    }
    let fx = fixture();
    let root = open(fx.path());
    ioctl::quota_enable(fd(&root), QuotaMode::Simple).unwrap();
    let status = ioctl::quota_status(fd(&root)).unwrap().expect("quotas on");
    eprintln!("simple: {status:?}");
    assert!(status.simple);
    assert!(!status.inconsistent);
    assert!(!status.rescan_running);
    assert_eq!(status.version, 1);
    let uuid = ioctl::fs_uuid(fd(&root)).unwrap();
    let mode =
        fs::read_to_string(format!("/sys/fs/btrfs/{}/qgroups/mode", format_uuid(&uuid))).unwrap();
    assert_eq!(mode.trim(), "squota");
    // Rescans are a full-mode notion.
    eprintln!(
        "rescan in simple mode: {:?}",
        ioctl::quota_rescan(fd(&root))
    );
}

/// Full qgroups on the fixture, and subvolume `a` holding a synced 10 MiB
/// file: the root, `a`'s path and its id.
fn full_quota_subvol_with_blob(fx: &LoopBtrfs) -> (File, PathBuf, SubvolId) {
    let root = open(fx.path());
    ioctl::quota_enable(fd(&root), QuotaMode::Full).unwrap();
    ioctl::quota_rescan_wait(fd(&root)).unwrap();
    let a = subvol(fx.path(), "a");
    let a_id = id_of(&a);
    write_bytes(&a.join("blob"), 10 * MIB).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    (root, a, a_id)
}

#[test]
fn qgroup_info_full_mode_matches_written_bytes_and_sysfs() {
    let fx = fixture();
    let (root, a, a_id) = full_quota_subvol_with_blob(&fx);

    let usage = ioctl::qgroup_info(fd(&root), a_id)
        .unwrap()
        .expect("qgroup of a");
    eprintln!("full, a: {usage:?}");
    assert!(within(usage.referenced, 10 * MIB, 256 * 1024), "{usage:?}");
    assert!(within(usage.exclusive, 10 * MIB, 256 * 1024), "{usage:?}");
    assert_eq!(usage.referenced, sysfs_qgroup(&root, a_id, "referenced"));
    assert_eq!(usage.exclusive, sysfs_qgroup(&root, a_id, "exclusive"));

    // A snapshot shares everything: both reference 10 MiB, neither holds it exclusively.
    ioctl::snapshot(fd(&open(&a)), fd(&root), OsStr::new("a-ro"), true).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    let a_ro_id = id_of(&fx.path().join("a-ro"));
    let a_usage = ioctl::qgroup_info(fd(&root), a_id).unwrap().unwrap();
    let ro_usage = ioctl::qgroup_info(fd(&root), a_ro_id).unwrap().unwrap();
    eprintln!("full, after snapshot: a {a_usage:?}, a-ro {ro_usage:?}");
    assert!(within(ro_usage.referenced, 10 * MIB, 256 * 1024));
    assert!(a_usage.exclusive < MIB && ro_usage.exclusive < MIB);
    for id in [a_id, a_ro_id] {
        let usage = ioctl::qgroup_info(fd(&root), id).unwrap().unwrap();
        assert_eq!(usage.referenced, sysfs_qgroup(&root, id, "referenced"));
        assert_eq!(usage.exclusive, sysfs_qgroup(&root, id, "exclusive"));
    }
    assert_eq!(
        ioctl::qgroup_info(fd(&root), SubvolId(1 << 40)).unwrap(),
        None
    );
}

#[test]
fn simple_quota_charges_snapshot_only_for_its_own_writes() {
    // Full qgroups: full_qgroups_count_a_writable_snapshots_own_writes_as_exclusive.
    if !has_simple_quotas("simple_quota_charges_snapshot_only_for_its_own_writes") {
        return;
    }
    let fx = fixture();
    let root = open(fx.path());
    ioctl::quota_enable(fd(&root), QuotaMode::Simple).unwrap();
    let a = subvol(fx.path(), "a");
    let a_id = id_of(&a);
    write_bytes(&a.join("blob"), 10 * MIB).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    let usage = ioctl::qgroup_info(fd(&root), a_id).unwrap().unwrap();
    eprintln!("simple, a: {usage:?}");
    assert!(within(usage.referenced, 10 * MIB, 256 * 1024), "{usage:?}");
    assert_eq!(usage.exclusive, usage.referenced);

    ioctl::snapshot(fd(&open(&a)), fd(&root), OsStr::new("b"), false).unwrap();
    let b = fx.path().join("b");
    let b_id = id_of(&b);
    ioctl::sync_fs(fd(&root)).unwrap();
    let fresh = ioctl::qgroup_info(fd(&root), b_id).unwrap().unwrap();
    eprintln!("simple, fresh snapshot b: {fresh:?}");
    assert!(fresh.referenced <= 64 * 1024, "{fresh:?}");

    write_bytes(&b.join("more"), 5 * MIB).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    let grown = ioctl::qgroup_info(fd(&root), b_id).unwrap().unwrap();
    eprintln!("simple, b after 5 MiB: {grown:?}");
    assert!(
        within(grown.referenced, 5 * MIB + fresh.referenced, 256 * 1024),
        "{grown:?}"
    );
    for id in [a_id, b_id] {
        let usage = ioctl::qgroup_info(fd(&root), id).unwrap().unwrap();
        assert_eq!(usage.referenced, sysfs_qgroup(&root, id, "referenced"));
        assert_eq!(usage.exclusive, sysfs_qgroup(&root, id, "exclusive"));
    }
}

#[test]
fn full_qgroups_count_a_writable_snapshots_own_writes_as_exclusive() {
    let fx = fixture();
    let (root, a, a_id) = full_quota_subvol_with_blob(&fx);

    ioctl::snapshot(fd(&open(&a)), fd(&root), OsStr::new("b"), false).unwrap();
    let b = fx.path().join("b");
    let b_id = id_of(&b);
    ioctl::sync_fs(fd(&root)).unwrap();
    let fresh = ioctl::qgroup_info(fd(&root), b_id).unwrap().unwrap();
    eprintln!("full, fresh snapshot b: {fresh:?}");
    assert!(within(fresh.referenced, 10 * MIB, 256 * 1024), "{fresh:?}");
    assert!(fresh.exclusive < MIB, "{fresh:?}");

    // Unlike simple quotas, b references a's data too; what it wrote is its exclusive.
    write_bytes(&b.join("more"), 5 * MIB).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    let grown = ioctl::qgroup_info(fd(&root), b_id).unwrap().unwrap();
    eprintln!("full, b after 5 MiB: {grown:?}");
    assert!(within(grown.referenced, 15 * MIB, 256 * 1024), "{grown:?}");
    assert!(
        within(grown.exclusive, 5 * MIB + fresh.exclusive, 256 * 1024),
        "{grown:?}"
    );
    let a_usage = ioctl::qgroup_info(fd(&root), a_id).unwrap().unwrap();
    assert!(
        a_usage.exclusive < MIB,
        "a shares its data with b: {a_usage:?}"
    );
    for id in [a_id, b_id] {
        let usage = ioctl::qgroup_info(fd(&root), id).unwrap().unwrap();
        assert_eq!(usage.referenced, sysfs_qgroup(&root, id, "referenced"));
        assert_eq!(usage.exclusive, sysfs_qgroup(&root, id, "exclusive"));
    }
}

/// Commits and wakes btrfs's cleaner until `done` holds or a minute has
/// passed (a loaded machine's cleaner can take seconds); returns how long
/// it took.
fn wake_cleaner_until(fs: &File, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() && start.elapsed() < Duration::from_secs(60) {
        ioctl::sync_and_wake_cleaner(fd(fs)).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Retries `op` while it fails with EBUSY (the cleaner has not dropped the
/// deleted subvolume yet).
fn retry_busy(fs: &File, mut op: impl FnMut() -> nix::Result<()>) -> nix::Result<Duration> {
    let mut result = Ok(());
    let waited = wake_cleaner_until(fs, || {
        result = op();
        result != Err(Errno::EBUSY)
    });
    result.map(|()| waited)
}

/// Waits until btrfs's cleaner has dropped deleted subvolume `id`.
fn wait_until_dropped(fs: &File, id: SubvolId) -> Duration {
    let present = || ioctl::subvolume_present(fd(fs), id).unwrap();
    let waited = wake_cleaner_until(fs, || !present());
    assert!(!present(), "{id} never dropped");
    waited
}

#[test]
fn qgroup_destroy_removes_stale_qgroup_in_simple_mode() {
    // Full qgroups: qgroup_of_deleted_subvolume_in_full_mode.
    if !has_simple_quotas("qgroup_destroy_removes_stale_qgroup_in_simple_mode") {
        return;
    }
    let fx = fixture();
    let root = open(fx.path());
    ioctl::quota_enable(fd(&root), QuotaMode::Simple).unwrap();
    let a = subvol(fx.path(), "a");
    let a_id = id_of(&a);
    write_bytes(&a.join("blob"), MIB).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    assert_eq!(
        ioctl::qgroup_destroy(fd(&root), a_id.0).unwrap_err(),
        Errno::EBUSY,
        "qgroup of a live subvolume"
    );
    // The snapshot keeps a's extents alive, and simple quotas keep charging them to a.
    ioctl::snapshot(fd(&open(&a)), fd(&root), OsStr::new("b"), true).unwrap();
    let b_id = id_of(&fx.path().join("b"));
    assert!(ioctl::subvolume_present(fd(&root), a_id).unwrap());
    ioctl::destroy_subvolume(fd(&root), a_id).unwrap();
    let waited = wait_until_dropped(&root, a_id);
    eprintln!("simple: deleted subvolume dropped after {waited:?}");
    let stale = ioctl::qgroup_info(fd(&root), a_id)
        .unwrap()
        .expect("stale qgroup");
    assert!(stale.referenced >= MIB, "{stale:?}");
    assert_eq!(
        ioctl::qgroup_destroy(fd(&root), a_id.0).unwrap_err(),
        Errno::EBUSY,
        "a stale simple-quota qgroup still charged with live extents"
    );

    // Once the last reference to those extents is gone the charge drops to zero, the
    // kernel removes b's own (empty) qgroup by itself, and a's stale one can go.
    ioctl::destroy_subvolume(fd(&root), b_id).unwrap();
    let waited = retry_busy(&root, || ioctl::qgroup_destroy(fd(&root), a_id.0)).unwrap();
    eprintln!("simple: stale qgroup destroyed after {waited:?}");
    // b's own qgroup goes when the cleaner drops b, which a loaded machine
    // may not have done yet.
    wait_until_dropped(&root, b_id);
    wake_cleaner_until(&root, || ioctl::qgroup_ids(fd(&root)).unwrap() == vec![5]);
    assert_eq!(ioctl::qgroup_ids(fd(&root)).unwrap(), vec![5]);
    assert_eq!(ioctl::qgroup_info(fd(&root), a_id).unwrap(), None);
    assert_eq!(
        ioctl::qgroup_destroy(fd(&root), a_id.0).unwrap_err(),
        Errno::ENOENT
    );
}

#[test]
fn qgroup_of_deleted_subvolume_in_full_mode() {
    let fx = fixture();
    let root = open(fx.path());
    ioctl::quota_enable(fd(&root), QuotaMode::Full).unwrap();
    ioctl::quota_rescan_wait(fd(&root)).unwrap();
    let a = subvol(fx.path(), "a");
    let a_id = id_of(&a);
    write_bytes(&a.join("blob"), MIB).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();
    ioctl::destroy_subvolume(fd(&root), a_id).unwrap();
    let result = retry_busy(&root, || ioctl::qgroup_destroy(fd(&root), a_id.0));
    eprintln!("full: qgroup_destroy after delete: {result:?}");
    match result {
        Ok(_) | Err(Errno::ENOENT) => {}
        Err(e) => panic!("qgroup_destroy: {e}"),
    }
    assert!(!ioctl::qgroup_ids(fd(&root)).unwrap().contains(&a_id.0));
}

#[test]
fn qgroup_limit_makes_writes_fail_with_edquot() {
    let fx = fixture();
    let root = open(fx.path());
    ioctl::quota_enable(fd(&root), QuotaMode::Full).unwrap();
    ioctl::quota_rescan_wait(fd(&root)).unwrap();
    let a = subvol(fx.path(), "a");
    let a_id = id_of(&a);
    ioctl::qgroup_limit(fd(&root), a_id.0, Some(4 * MIB)).unwrap();

    let err = write_bytes(&a.join("big"), 16 * MIB).unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::EDQUOT), "{err}");
    fs::remove_file(a.join("big")).unwrap();
    ioctl::sync_fs(fd(&root)).unwrap();

    ioctl::qgroup_limit(fd(&root), a_id.0, None).unwrap();
    write_bytes(&a.join("big"), 16 * MIB).unwrap();
    assert_eq!(
        ioctl::qgroup_limit(fd(&root), 1 << 40, Some(MIB)).unwrap_err(),
        Errno::ENOENT
    );
}

#[test]
fn highest_inode_grows_with_created_files() {
    let fx = fixture();
    let a = subvol(fx.path(), "a");
    let a_dir = open(&a);
    let before = ioctl::highest_inode(fd(&a_dir)).unwrap();
    assert_eq!(
        before, 256,
        "an empty subvolume has only its root directory"
    );
    const N: u64 = 1000;
    for i in 0..N {
        File::create(a.join(format!("f{i}"))).unwrap();
    }
    let after = ioctl::highest_inode(fd(&a_dir)).unwrap();
    eprintln!("highest inode: {before} -> {after}");
    assert!(
        after >= before + N && after <= before + N + 16,
        "{before} -> {after}"
    );
    // Any fd inside the subvolume answers for the subvolume's tree.
    assert_eq!(
        ioctl::highest_inode(fd(&open(&a.join("f0")))).unwrap(),
        after
    );
    // The top-level subvolume's tree is separate.
    let top = ioctl::highest_inode(fd(&open(fx.path()))).unwrap();
    assert!(top < 300, "{top}");
    // Deleting the newest file lowers the answer.
    fs::remove_file(a.join(format!("f{}", N - 1))).unwrap();
    ioctl::sync_fs(fd(&a_dir)).unwrap();
    let after_delete = ioctl::highest_inode(fd(&a_dir)).unwrap();
    eprintln!("highest inode after deleting the newest file: {after_delete}");
    assert!(after_delete < after);
}

#[test]
fn readonly_subvolume_can_be_renamed_only_within_its_directory() {
    let fx = fixture();
    let active = fx.path().join("active");
    let committed = fx.path().join("committed");
    fs::create_dir(&active).unwrap();
    fs::create_dir(&committed).unwrap();
    let work = subvol(&active, "7");
    fs::write(work.join("f"), b"data").unwrap();
    let id = id_of(&work);
    ioctl::sync_fs(fd(&open(&work))).unwrap();
    ioctl::set_readonly(fd(&open(&work)), true).unwrap();

    // Moving a directory to another parent needs write permission on the directory
    // itself (its ".." changes, vfs_rename), and btrfs denies any write permission in a
    // read-only subvolume.
    let err = fs::rename(&work, committed.join("7")).unwrap_err();
    assert_eq!(errno_of(&err), Some(Errno::EROFS), "{err}");
    // Within the same directory the subvolume itself is not written: allowed.
    fs::rename(&work, active.join("7-committed")).unwrap();
    let renamed = active.join("7-committed");
    assert_eq!(id_of(&renamed), id);
    assert!(ioctl::is_readonly(fd(&open(&renamed))).unwrap());

    // Rename while writable, then set read-only: works across directories.
    ioctl::set_readonly(fd(&open(&renamed)), false).unwrap();
    fs::rename(&renamed, committed.join("7")).unwrap();
    let moved = committed.join("7");
    ioctl::set_readonly(fd(&open(&moved)), true).unwrap();
    assert_eq!(id_of(&moved), id);
    assert_eq!(fs::read(moved.join("f")).unwrap(), b"data");
}

/// Per-call cost of `qgroup_info` and `highest_inode` on a subvolume with 100 000 small
/// files. Prints, asserts nothing about time. Slow (creates 100 000 files): run with
/// `cargo test --release -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: creates 100 000 files"]
fn measure_query_costs_with_100k_files() {
    let fx = fixture();
    let root = open(fx.path());
    ioctl::quota_enable(fd(&root), QuotaMode::Simple).unwrap();
    let a = subvol(fx.path(), "a");
    let a_id = id_of(&a);
    let start = Instant::now();
    for d in 0..100 {
        let dir = a.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for i in 0..1000 {
            fs::write(dir.join(format!("f{i}")), b"small file contents\n").unwrap();
        }
    }
    ioctl::sync_fs(fd(&root)).unwrap();
    eprintln!("created 100 000 files in {:?}", start.elapsed());

    let a_dir = open(&a);
    let rounds = 2000;
    let start = Instant::now();
    for _ in 0..rounds {
        ioctl::qgroup_info(fd(&root), a_id).unwrap().unwrap();
    }
    let per_info = start.elapsed() / rounds;
    let start = Instant::now();
    let mut highest = 0;
    for _ in 0..rounds / 10 {
        highest = ioctl::highest_inode(fd(&a_dir)).unwrap();
    }
    let per_highest = start.elapsed() / (rounds / 10);
    let usage = ioctl::qgroup_info(fd(&root), a_id).unwrap().unwrap();
    eprintln!(
        "qgroup_info: {per_info:?}/call ({usage:?}); highest_inode: {per_highest:?}/call \
         (= {highest})"
    );
    let sysfs_start = Instant::now();
    for _ in 0..rounds {
        sysfs_qgroup(&root, a_id, "referenced");
    }
    eprintln!(
        "sysfs read (with fs_uuid): {:?}/call",
        sysfs_start.elapsed() / rounds
    );
}

#[test]
fn loop_fixture_cleans_up_even_while_busy_and_on_panic() {
    let mounted = |p: &Path| {
        fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|line| line.split(' ').nth(1) == Some(p.to_str().unwrap()))
    };
    // A file still open keeps the mount busy: Drop falls back to a lazy unmount.
    let fx = fixture();
    let (mount, image) = (fx.path().to_path_buf(), fx.image().to_path_buf());
    assert!(mounted(&mount));
    let held = File::create(mount.join("held")).unwrap();
    drop(fx);
    assert!(!mounted(&mount) && !mount.exists() && !image.exists());
    drop(held);

    // A panicking test still unmounts and removes its filesystem. (The panic message
    // this prints is expected.)
    let paths = std::panic::catch_unwind(|| {
        let fx = fixture();
        let paths = (fx.path().to_path_buf(), fx.image().to_path_buf());
        std::panic::panic_any(paths);
    })
    .unwrap_err();
    let (mount, image) = paths.downcast_ref::<(PathBuf, PathBuf)>().unwrap().clone();
    assert!(!mounted(&mount) && !mount.exists() && !image.exists());
}

#[test]
fn subvolume_tree_bytes_track_the_tree_and_start_at_the_source() {
    let fx = fixture();
    let root = open(fx.path());
    let a = subvol(fx.path(), "a");
    let a_id = id_of(&a);
    ioctl::sync_fs(fd(&root)).unwrap();
    let empty = ioctl::subvolume_tree_bytes(fd(&root), a_id).unwrap();
    assert_eq!(empty, 16 * 1024, "one leaf of the default node size");
    for i in 0..2000 {
        fs::write(a.join(format!("f{i}")), [i as u8; 4096]).unwrap();
    }
    ioctl::sync_fs(fd(&root)).unwrap();
    let full = ioctl::subvolume_tree_bytes(fd(&root), a_id).unwrap();
    // Inode, directory and extent items of 2000 files: ~500 bytes each.
    assert!(full > empty + 2000 * 300, "{full}");
    ioctl::snapshot(fd(&open(&a)), fd(&root), OsStr::new("b"), true).unwrap();
    let b_id = id_of(&fx.path().join("b"));
    assert_eq!(ioctl::subvolume_tree_bytes(fd(&root), b_id).unwrap(), full);
    assert_eq!(
        ioctl::subvolume_tree_bytes(fd(&root), SubvolId(b_id.0 + 100)).unwrap_err(),
        Errno::ENOENT
    );
}

#[test]
fn metadata_file_is_created_nocow_on_btrfs() {
    let fx = fixture();
    let path = fx.path().join("metadata.redb");
    drop(cowsnap::meta::MetaStore::open(&path).unwrap());
    assert!(ioctl::is_nocow(File::open(&path).unwrap().as_fd()).unwrap());
    // A file created the ordinary way is copy-on-write.
    let other = fx.path().join("other");
    fs::write(&other, b"x").unwrap();
    assert!(!ioctl::is_nocow(File::open(&other).unwrap().as_fd()).unwrap());
    // Reopening finds its records (it is not created again).
    let m = cowsnap::meta::MetaStore::open(&path).unwrap();
    drop(m);
    assert!(fs::metadata(&path).unwrap().len() > 0);
}
