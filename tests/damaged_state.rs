//! Damaged state: a corrupted, truncated, emptied or missing metadata
//! database, a missing root, a root on the wrong filesystem, subvolumes
//! deleted behind cowsnap's back (datasets destroyed, on ZFS), quota
//! accounting switched off or inconsistent (btrfs). Each is detected and
//! reported (at startup or when the snapshot is used), and never "fixed"
//! by destroying snapshot data: a daemon that cannot trust its metadata
//! refuses to start and leaves the metadata file and every subvolume (or
//! dataset) as they were.
//! Run as root (the fixtures make loop devices and a tmpfs mount).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use tonic::Code;

const BASE_LEN: usize = 100_000;
const WORK_LEN: usize = 1_000_000;

/// A stopped daemon whose root holds a committed `base` (id 1), an active
/// `work` on it (id 2) and a view `v` of it (id 3).
async fn seeded() -> Daemon {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    let dir = mount_dir(&prepare(&mut c, "base-x", "").await.unwrap());
    write_pattern(&dir.join("f"), BASE_LEN, 1);
    commit(&mut c, "base", "base-x").await.unwrap();
    let w = mount_dir(&prepare(&mut c, "work", "base").await.unwrap());
    write_pattern(&w.join("w"), WORK_LEN, 2);
    view(&mut c, "v", "base").await.unwrap();
    drop(c);
    assert!(d.stop());
    d
}

fn metadata_path(d: &Daemon) -> PathBuf {
    d.root.join("metadata.redb")
}

/// The snapshot objects on disk (read without the metadata).
fn object_ids(d: &Daemon) -> Vec<u64> {
    let mut ids: Vec<u64> = d
        .backend()
        .scan()
        .expect("scan")
        .iter()
        .map(|o| o.id.0)
        .collect();
    ids.sort_unstable();
    ids
}

/// Checks the seeded snapshots are all there with their data, through a
/// running daemon.
async fn assert_seeded_intact(d: &Daemon) {
    let mut c = d.client().await;
    let v = mount_dir(&view(&mut c, "check", "base").await.unwrap());
    assert!(has_pattern(&v.join("f"), BASE_LEN, 1), "base data");
    remove(&mut c, "check").await.unwrap();
    let w = mount_dir(&mounts(&mut c, "work").await.unwrap());
    assert!(has_pattern(&w.join("w"), WORK_LEN, 2), "work data");
    assert_eq!(stat(&mut c, "v").await.unwrap().kind, pb::Kind::View as i32);
}

/// Damages the metadata with `damage`, checks the daemon refuses to start
/// with a message containing `says`, leaves the file as it was and
/// destroys nothing; then restores the file and checks everything is back.
async fn refuses_then_recovers(damage: impl FnOnce(&Path), says: &[&str]) -> String {
    let mut d = seeded().await;
    let path = metadata_path(&d);
    let good = std::fs::read(&path).unwrap();
    damage(&path);
    let damaged = std::fs::read(&path).ok();
    let (status, log) = d.spawn_expect_exit();
    assert!(!status.success(), "refused with a failure status");
    for s in says {
        assert!(log.contains(s), "the refusal says {s:?}:\n{log}");
    }
    assert_eq!(
        std::fs::read(&path).ok(),
        damaged,
        "the damaged metadata was left as it was"
    );
    assert_eq!(object_ids(&d), vec![1, 2, 3], "no snapshot destroyed");
    // A second attempt refuses the same way (nothing was "repaired").
    let (status, _) = d.spawn_expect_exit();
    assert!(!status.success());
    assert_eq!(object_ids(&d), vec![1, 2, 3]);
    // Restoring the metadata brings everything back.
    std::fs::write(&path, good).unwrap();
    d.spawn().await;
    assert_seeded_intact(&d).await;
    assert!(d.stop());
    assert!(d.inventory().is_clean());
    log
}

#[tokio::test]
async fn metadata_with_a_corrupted_header_refuses_to_start() {
    refuses_then_recovers(
        |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&[0xa5; 512], 0).unwrap();
        },
        &["metadata.redb", "Not a redb database"],
    )
    .await;
}

#[tokio::test]
async fn metadata_with_a_corrupted_page_refuses_to_start() {
    // redb panics on the damaged page ("Invalid page type byte"); the
    // daemon exits non-zero with that message. It does not name the
    // metadata file: see docs/security.md, Damaged state.
    refuses_then_recovers(
        |p| {
            let len = std::fs::metadata(p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&[0xa5; 4096], len / 2).unwrap();
        },
        &[],
    )
    .await;
}

#[tokio::test]
async fn truncated_metadata_refuses_to_start() {
    refuses_then_recovers(
        |p| {
            let len = std::fs::metadata(p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(len / 2).unwrap();
        },
        &["metadata.redb", "truncated"],
    )
    .await;
}

#[tokio::test]
async fn emptied_metadata_refuses_to_start_instead_of_destroying_every_snapshot() {
    refuses_then_recovers(
        |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(0).unwrap();
        },
        &["metadata.redb", "missing or empty", "3 snapshot objects"],
    )
    .await;
}

#[tokio::test]
async fn missing_metadata_refuses_to_start_instead_of_destroying_every_snapshot() {
    refuses_then_recovers(
        |p| std::fs::remove_file(p).unwrap(),
        &["metadata.redb", "missing or empty", "refusing to start"],
    )
    .await;
}

#[tokio::test]
async fn missing_root_starts_empty_and_leaves_the_moved_data_alone() {
    // A root that is not there (an unmounted disk, a renamed directory) is
    // created afresh: there is nothing to tell it from a first start. It
    // is logged, and the data elsewhere is not touched.
    let mut d = seeded().await;
    let moved = d.fs.path().join("root.moved");
    std::fs::rename(&d.root, &moved).unwrap();
    if backend_is_zfs() {
        // On ZFS the snapshots are not in the root but in the datasets,
        // which are still there: with the root gone the metadata is gone,
        // and the daemon refuses to start as for a deleted metadata file.
        let (status, log) = d.spawn_expect_exit();
        assert!(!status.success(), "refused with a failure status");
        assert!(
            log.contains("missing or empty") && log.contains("3 snapshot objects"),
            "{log}"
        );
        assert_eq!(object_ids(&d), vec![1, 2, 3], "no dataset destroyed");
        if d.root.exists() {
            std::fs::remove_dir_all(&d.root).unwrap();
        }
        std::fs::rename(&moved, &d.root).unwrap();
        d.spawn().await;
        assert_seeded_intact(&d).await;
        assert!(d.stop());
        assert!(d.inventory().is_clean());
        return;
    }
    d.spawn().await;
    assert!(d.log_text().contains("created root directory"));
    let mut c = d.client().await;
    assert!(list(&mut c, &[]).await.unwrap().is_empty());
    drop(c);
    assert!(d.stop());
    // The new root holds no subvolume: remove it and put the old one back.
    for area in ["active", "view", "committed"] {
        std::fs::remove_dir(d.root.join(area)).unwrap();
    }
    for entry in std::fs::read_dir(&d.root).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    std::fs::remove_dir(&d.root).unwrap();
    std::fs::rename(&moved, &d.root).unwrap();
    d.spawn().await;
    assert_seeded_intact(&d).await;
    assert!(d.stop());
    assert!(d.inventory().is_clean());
}

/// A tmpfs mounted on a fresh directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new() -> Tmpfs {
        let dir = Path::new(LoopBtrfs::DEFAULT_PARENT).join(format!(
            "cowsnap-tmpfs.{}.{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ u128::from(rand_u32())
        ));
        std::fs::create_dir(&dir).unwrap();
        let t = Tmpfs(dir);
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&t.0)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        t
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Runs `cowsnap serve` once with `config` and expects it to refuse to
/// start; returns its stderr.
fn serve_expecting_refusal(root: &Path, socket: &Path, config: &str) -> String {
    let cfg = root.parent().unwrap().join("config.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(["serve", "--root"])
        .arg(root)
        .arg("--address")
        .arg(socket)
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(!status.success(), "refused with a failure status");
            return String::from_utf8_lossy(&out.stderr).into_owned();
        }
        if Instant::now() > deadline || socket.exists() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon served with a root or dataset it should refuse");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn root_on_the_wrong_filesystem_is_refused_when_the_embedded_image_is_off() {
    // ZFS: see zfs_dataset_that_cannot_be_used_is_refused.
    if skip_on_zfs("the btrfs backend's check of its root's filesystem") {
        return;
    }
    let t = Tmpfs::new();
    let root = t.0.join("root");
    let err = serve_expecting_refusal(&root, &t.0.join("sock"), "[embedded]\nenabled = false\n");
    assert!(err.contains("not btrfs"), "{err}");
    assert!(err.contains("tmpfs"), "names the filesystem: {err}");
}

#[test]
fn root_on_the_wrong_filesystem_with_content_is_not_hidden_under_an_image() {
    // E.g. the btrfs that held the root is not mounted, and its mount
    // point holds something else: cowsnap must not mount a new image over
    // it and start empty.
    if skip_on_zfs("the btrfs backend's embedded image over a non-btrfs root") {
        return;
    }
    let t = Tmpfs::new();
    let root = t.0.join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("metadata.redb"), b"not on btrfs").unwrap();
    let err = serve_expecting_refusal(&root, &t.0.join("sock"), "");
    assert!(err.contains("not empty"), "{err}");
    assert!(
        !t.0.join("root.img").exists(),
        "no image created beside the root"
    );
    assert_eq!(
        std::fs::read(root.join("metadata.redb")).unwrap(),
        b"not on btrfs"
    );
}

#[test]
fn zfs_dataset_that_cannot_be_used_is_refused() {
    // The ZFS counterpart of a root on the wrong filesystem: the
    // configured parent dataset is in no pool, or is no valid name.
    if !backend_is_zfs() {
        say_skipped("on btrfs: the zfs backend's check of its dataset");
        return;
    }
    let t = Tmpfs::new();
    let root = t.0.join("root");
    let config = "backend = \"zfs\"\n[zfs]\ndataset = \"nosuchpool-cowsnap/x\"\n";
    let err = serve_expecting_refusal(&root, &t.0.join("sock"), config);
    assert!(err.contains("cannot be created"), "{err}");
    assert!(
        err.contains("nosuchpool-cowsnap/x"),
        "names the dataset: {err}"
    );
    let config = "backend = \"zfs\"\n[zfs]\ndataset = \"a b/c\"\n";
    let err = serve_expecting_refusal(&root, &t.0.join("sock"), config);
    assert!(
        err.contains("zfs.dataset") && err.contains("a b/c"),
        "names the setting: {err}"
    );
}

#[tokio::test]
async fn committed_subvolume_deleted_behind_the_back_is_reported_and_stays_removable() {
    let mut d = seeded().await;
    // ZFS refuses to destroy a dataset whose snapshot has clones: the
    // operator's `zfs destroy -R` takes its children (work, v) with it.
    let zfs = backend_is_zfs();
    d.destroy_object("committed", 1, zfs);
    d.spawn().await;
    let log = d.log_text();
    assert!(
        log.contains("committed snapshot has lost its filesystem object")
            && log.contains("committed_missing: [\"base\"]"),
        "reported at startup:\n{log}"
    );
    let mut c = d.client().await;
    // The record is kept (its children depend on it) and says what it is.
    assert_eq!(
        stat(&mut c, "base").await.unwrap().kind,
        pb::Kind::Committed as i32
    );
    if zfs {
        assert!(
            log.contains("records_dropped: [\"v\", \"work\"]"),
            "the children destroyed with it are dropped:\n{log}"
        );
        for key in ["work", "v"] {
            assert_eq!(stat(&mut c, key).await.unwrap_err().code(), Code::NotFound);
        }
    } else {
        // Its children made before the loss are whole snapshots of their own.
        let w = mount_dir(&mounts(&mut c, "work").await.unwrap());
        assert!(has_pattern(&w.join("w"), WORK_LEN, 2));
        assert!(has_pattern(&w.join("f"), BASE_LEN, 1));
    }
    // A new child cannot be made; the error names what is missing.
    let e = prepare(&mut c, "new", "base").await.unwrap_err();
    assert!(e.message().contains("committed/1"), "{e}");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert_eq!(
        stat(&mut c, "new").await.unwrap_err().code(),
        Code::NotFound
    );
    // containerd's garbage collector can still remove it all.
    if !zfs {
        remove(&mut c, "work").await.unwrap();
        remove(&mut c, "v").await.unwrap();
    }
    remove(&mut c, "base").await.unwrap();
    cleanup(&mut c).await.unwrap();
    drop(c);
    assert!(d.stop());
    let inv = d.inventory();
    assert!(inv.is_clean() && inv.records.is_empty(), "{inv:#?}");
}

#[tokio::test]
async fn active_subvolume_deleted_behind_the_back_is_dropped_at_startup_and_logged() {
    let mut d = seeded().await;
    d.destroy_object("active", 2, false);
    d.spawn().await;
    let log = d.log_text();
    assert!(
        log.contains("dropping record whose object is missing")
            && log.contains("records_dropped: [\"work\"]"),
        "reported at startup:\n{log}"
    );
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "work").await.unwrap_err().code(),
        Code::NotFound
    );
    // Its key can be used again; the rest is intact.
    prepare(&mut c, "work", "base").await.unwrap();
    let v = mount_dir(&view(&mut c, "check", "base").await.unwrap());
    assert!(has_pattern(&v.join("f"), BASE_LEN, 1));
    drop(c);
    assert!(d.stop());
    assert!(d.inventory().is_clean());
}

#[tokio::test]
async fn subvolume_deleted_while_serving_fails_its_calls_and_removes_cleanly() {
    let mut d = seeded().await;
    d.spawn().await;
    let mut c = d.client().await;
    d.destroy_object("active", 2, false);
    // Calls that need the object fail and say which object is missing.
    let e = usage(&mut c, "work").await.unwrap_err();
    assert!(e.message().contains("active/2"), "{e}");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = commit(&mut c, "layer", "work").await.unwrap_err();
    assert!(e.message().contains("active/2"), "{e}");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = c
        .mounts(
            cowsnap::proto::containerd::services::snapshots::v1::MountsRequest {
                key: "work".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "mounts of a missing object: {e}"
    );
    assert_eq!(
        stat(&mut c, "layer").await.unwrap_err().code(),
        Code::NotFound
    );
    // Remove must succeed: containerd's GC aborts its pass on an error.
    remove(&mut c, "work").await.unwrap();
    cleanup(&mut c).await.unwrap();
    drop(c);
    assert!(d.stop());
    assert!(d.inventory().is_clean());
    d.spawn().await;
    assert!(d.log_text().contains("metadata and filesystem agree"));
}

#[tokio::test]
async fn quota_accounting_found_inconsistent_is_reported_at_startup() {
    // ZFS keeps its space accounting per dataset, never inconsistent.
    if skip_on_zfs("btrfs qgroup accounting") {
        return;
    }
    // Full qgroups, then a qgroup relation added without a rescan: btrfs
    // flags its accounting inconsistent.
    let fs = LoopBtrfs::new().unwrap();
    let mnt = fs.path().to_owned();
    let btrfs = |args: &[&str]| {
        let out = Command::new("btrfs").args(args).arg(&mnt).output().unwrap();
        assert!(
            out.status.success(),
            "btrfs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    btrfs(&["quota", "enable"]);
    let mut d = Daemon::on(fs, "");
    d.spawn().await;
    let mut c = d.client().await;
    let b = mount_dir(&prepare(&mut c, "base-x", "").await.unwrap());
    write_pattern(&b.join("f"), WORK_LEN, 1);
    commit(&mut c, "base", "base-x").await.unwrap();
    let w = mount_dir(&prepare(&mut c, "work", "base").await.unwrap());
    write_pattern(&w.join("w"), WORK_LEN, 2);
    drop(c);
    assert!(d.stop());
    nix::unistd::sync();
    // `work` (subvolume 257) shares base's extents: its referenced and
    // exclusive bytes differ, so btrfs cannot update a parent group
    // without a rescan.
    btrfs(&["qgroup", "create", "1/0"]);
    btrfs(&["qgroup", "assign", "--no-rescan", "0/257", "1/0"]);
    // The flag is read from the quota tree: commit the transaction.
    btrfs(&["filesystem", "sync"]);
    d.spawn().await;
    assert!(
        d.log_text()
            .contains("btrfs reports its quota accounting inconsistent"),
        "reported at startup:\n{}",
        d.log_text()
    );
    // The daemon serves; figures may be off until a rescan, data is whole.
    let mut c = d.client().await;
    usage(&mut c, "work").await.unwrap();
    commit(&mut c, "layer", "work").await.unwrap();
    let v = mount_dir(&view(&mut c, "check", "layer").await.unwrap());
    assert!(has_pattern(&v.join("w"), WORK_LEN, 2));
    drop(c);
    assert!(d.stop());
    assert!(d.inventory().is_clean());
}
