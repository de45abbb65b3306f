//! A full filesystem: cowsnap's calls fail with a clear error
//! (ResourceExhausted, never Internal or Unknown), its metadata stays
//! consistent, nothing committed is lost, and it serves normally again once
//! space is freed. Also a quota limit reached inside a container.
//! Run as root (the fixtures make small loop-backed btrfs filesystems).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use cowsnap::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use tonic::Code;
use tonic::transport::Channel;

/// Size of the filesystem: small enough to fill in a second or two.
const FS_SIZE: u64 = 300 << 20;
const MIB: usize = 1 << 20;
const OWN: usize = 256 * 1024;

/// A directory outside the small filesystem for the daemon's log, removed
/// on drop, so the log can be read while the filesystem is full.
struct LogDir(PathBuf);

impl LogDir {
    fn new(tag: &str) -> LogDir {
        let dir = std::env::temp_dir().join(format!(
            "cowsnap-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        LogDir(dir)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon on a fresh small filesystem; with `log_dir`, its log is kept
/// there instead of on that filesystem.
async fn small_daemon(log_dir: Option<&LogDir>) -> Daemon {
    let fs = LoopBtrfs::new_in(Path::new(LoopBtrfs::DEFAULT_PARENT), FS_SIZE).expect("small fs");
    let mut d = Daemon::on(fs, "");
    if let Some(dir) = log_dir {
        d.log = dir.0.join("daemon.log");
    }
    d.spawn().await;
    d
}

/// Writes 1 MiB chunks to `path` until the filesystem refuses, syncs, then
/// fills what is left with small files. Returns how many bytes made it.
fn fill(dir: &Path) -> u64 {
    let mut f = std::fs::File::create(dir.join("fill")).expect("create filler");
    let chunk = vec![0x5a_u8; MIB];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                break;
            }
        }
    }
    // The last delayed allocations may fail only now.
    let _ = f.sync_all();
    drop(f);
    for i in 0..10_000 {
        if std::fs::write(dir.join(format!("s{i}")), [0u8; 4096]).is_err() {
            break;
        }
    }
    nix::unistd::sync();
    written
}

/// Committed snapshots and the seed of the file each wrote itself.
type Committed = BTreeMap<String, u8>;

/// A committed `base` (2 MiB), actives `w0..w3` on it (256 KiB each, not
/// yet committed) and an active `filler` that filled the filesystem.
async fn fill_up(c: &mut SnapshotsClient<Channel>) -> (Committed, PathBuf) {
    let mut committed = Committed::new();
    let dir = mount_dir(&prepare(c, "base-x", "").await.unwrap());
    write_pattern(&dir.join("base"), 2 * MIB, 1);
    commit(c, "base", "base-x").await.unwrap();
    committed.insert("base".into(), 1);
    for i in 0..4u8 {
        let dir = mount_dir(&prepare(c, &format!("w{i}"), "base").await.unwrap());
        write_pattern(&dir.join("own"), OWN, 10 + i);
    }
    let filler = mount_dir(&prepare(c, "filler", "base").await.unwrap());
    let written = fill(&filler);
    assert!(written > 100 * MIB as u64, "filled only {written} bytes");
    (committed, filler)
}

fn upd(name: &str, labels_: &[(&str, &str)]) -> pb::UpdateSnapshotRequest {
    pb::UpdateSnapshotRequest {
        snapshotter: String::new(),
        info: Some(pb::Info {
            name: name.into(),
            labels: labels(labels_),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["labels".into()],
        }),
    }
}

/// Runs every kind of call on the full filesystem. Each must succeed (btrfs
/// keeps a reserve for metadata) or fail with ResourceExhausted. Returns
/// the answers, for the test's output.
async fn calls_on_full_disk(
    c: &mut SnapshotsClient<Channel>,
    committed: &mut Committed,
) -> Vec<String> {
    let mut answers = Vec::new();
    let mut check = |what: String, res: Result<(), tonic::Status>| {
        match &res {
            Ok(()) => answers.push(format!("{what}: OK")),
            Err(e) => {
                answers.push(format!("{what}: {:?}", e.code()));
                assert_eq!(
                    e.code(),
                    Code::ResourceExhausted,
                    "{what} on a full disk must fail with ResourceExhausted: {e}"
                );
                assert!(
                    e.message().contains("No space left"),
                    "{what}: the message says why: {e}"
                );
            }
        }
        res.is_ok()
    };
    for i in 0..4u8 {
        let name = format!("layer{i}");
        if check(
            format!("commit {name}"),
            commit(c, &name, &format!("w{i}")).await,
        ) {
            committed.insert(name, 10 + i);
        }
    }
    for i in 0..3 {
        let key = format!("new{i}");
        check(
            format!("prepare {key}"),
            prepare(c, &key, "base").await.map(drop),
        );
        let key = format!("view{i}");
        check(format!("view {key}"), view(c, &key, "base").await.map(drop));
    }
    check(
        "prepare empty".into(),
        prepare(c, "empty", "").await.map(drop),
    );
    check(
        "update base".into(),
        c.update(upd("base", &[("k", "v")])).await.map(drop),
    );
    check("cleanup".into(), cleanup(c).await);
    answers
}

/// Frees the filler's space and removes it.
async fn free_space(c: &mut SnapshotsClient<Channel>, filler: &Path) {
    std::fs::remove_file(filler.join("fill")).expect("rm fill");
    nix::unistd::sync();
    remove(c, "filler")
        .await
        .expect("remove filler after freeing space");
    nix::unistd::sync();
}

/// Checks that every snapshot in `committed` is there with its data, and
/// that the daemon serves every kind of call.
async fn assert_committed_intact_and_serving(
    c: &mut SnapshotsClient<Channel>,
    committed: &mut Committed,
) {
    for i in 0..4u8 {
        let name = format!("layer{i}");
        if let std::collections::btree_map::Entry::Vacant(slot) = committed.entry(name) {
            commit(c, slot.key(), &format!("w{i}"))
                .await
                .unwrap_or_else(|e| panic!("commit {} after freeing space: {e}", slot.key()));
            slot.insert(10 + i);
        }
    }
    let dir = mount_dir(&prepare(c, "after", "layer0").await.unwrap());
    write_pattern(&dir.join("after"), MIB, 99);
    commit(c, "after-layer", "after").await.unwrap();
    c.update(upd("base", &[("k", "v2")])).await.unwrap();
    cleanup(c).await.unwrap();
    for (name, seed) in committed.iter() {
        let key = format!("check-{name}");
        let v = mount_dir(&view(c, &key, name).await.unwrap());
        assert!(
            has_pattern(&v.join("base"), 2 * MIB, 1),
            "{name}: base data"
        );
        if name != "base" {
            assert!(has_pattern(&v.join("own"), OWN, *seed), "{name}: own data");
        }
        remove(c, &key).await.unwrap();
    }
}

/// Stops the daemon, checks metadata against the filesystem, restarts it
/// and checks that every committed snapshot is still there.
async fn assert_consistent_across_restart(d: &mut Daemon, committed: &Committed) {
    assert!(d.stop(), "clean stop:\n{}", d.log_text());
    d.check_consistent();
    d.spawn().await;
    let mut c = d.client().await;
    for name in committed.keys() {
        assert_eq!(
            stat(&mut c, name).await.unwrap().kind,
            pb::Kind::Committed as i32,
            "{name} after restart"
        );
    }
    drop(c);
    assert!(d.stop());
    d.check_consistent();
}

/// The first write the metadata store cannot make is ResourceExhausted,
/// and a restart once space is free finds the metadata intact and nothing
/// committed lost.
#[tokio::test]
async fn full_disk_refuses_with_resource_exhausted_and_loses_nothing() {
    let log = LogDir::new("full-disk");
    let mut d = small_daemon(Some(&log)).await;
    let mut c = d.client().await;
    let (mut committed, filler) = fill_up(&mut c).await;

    // The first call that needs to write fails clearly.
    let res = commit(&mut c, "layer0", "w0").await;
    match &res {
        Ok(()) => {
            committed.insert("layer0".into(), 10);
        }
        Err(e) => {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
            assert!(e.message().contains("No space left"), "{e}");
        }
    }
    // Reads on a full disk answer, or fail with ResourceExhausted while the
    // metadata database cannot be reopened for lack of space.
    if let Err(e) = stat(&mut c, "base").await {
        assert_eq!(
            e.code(),
            Code::ResourceExhausted,
            "stat on a full disk: {e}"
        );
    }
    eprintln!("full disk: first commit answered {res:?}");

    // Free the space inside the container; a restart (which reopens the
    // metadata) brings everything back.
    std::fs::remove_file(filler.join("fill")).expect("rm fill");
    nix::unistd::sync();
    drop(c);
    assert!(d.stop(), "clean stop:\n{}", d.log_text());
    d.check_consistent();
    d.spawn().await;
    let mut c = d.client().await;
    remove(&mut c, "filler").await.unwrap();
    assert_committed_intact_and_serving(&mut c, &mut committed).await;
    drop(c);
    assert_consistent_across_restart(&mut d, &committed).await;
}

/// Every call on a full disk succeeds or fails with ResourceExhausted, and
/// once space is freed the same daemon serves normally, without a restart.
#[tokio::test]
async fn full_disk_recovers_without_a_restart() {
    let log = LogDir::new("full-disk");
    let mut d = small_daemon(Some(&log)).await;
    let mut c = d.client().await;
    let (mut committed, filler) = fill_up(&mut c).await;
    let answers = calls_on_full_disk(&mut c, &mut committed).await;
    eprintln!("full disk answers: {answers:#?}");
    // Reads answer, or fail with ResourceExhausted while the metadata
    // cannot be reopened for lack of space; never another code.
    match list(&mut c, &[]).await {
        Ok(listed) => {
            for name in committed.keys() {
                assert!(listed.iter().any(|i| &i.name == name), "{name} listed");
            }
        }
        Err(e) => assert_eq!(
            e.code(),
            Code::ResourceExhausted,
            "list on a full disk: {e}"
        ),
    }
    for name in committed.keys() {
        if let Err(e) = usage(&mut c, name).await {
            assert_eq!(
                e.code(),
                Code::ResourceExhausted,
                "usage on a full disk: {e}"
            );
        }
    }
    free_space(&mut c, &filler).await;
    assert_committed_intact_and_serving(&mut c, &mut committed).await;
    drop(c);
    assert_consistent_across_restart(&mut d, &committed).await;
}

/// Like the above with the daemon's own log on the full filesystem (a
/// daemon started with `2>>/var/lib/.../cowsnap.log`): a log line that
/// cannot be written must not turn an answer into a panic.
#[tokio::test]
async fn full_disk_with_the_log_on_it_still_answers() {
    let mut d = small_daemon(None).await;
    let mut c = d.client().await;
    let (mut committed, filler) = fill_up(&mut c).await;
    let answers = calls_on_full_disk(&mut c, &mut committed).await;
    eprintln!("full disk (log on it) answers: {answers:#?}");
    free_space(&mut c, &filler).await;
    assert_committed_intact_and_serving(&mut c, &mut committed).await;
    drop(c);
    assert_consistent_across_restart(&mut d, &committed).await;
}

/// A quota limit on a container's snapshot: the container's writes fail
/// with EDQUOT, and cowsnap still commits, measures and removes it.
#[tokio::test]
async fn quota_limit_reached_inside_a_snapshot_is_contained() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    let dir = mount_dir(&prepare(&mut c, "ctr", "").await.unwrap());
    let st = std::process::Command::new("btrfs")
        .args(["qgroup", "limit", "8M"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut f = std::fs::File::create(dir.join("big")).unwrap();
    let chunk = vec![7u8; MIB];
    let mut err = None;
    for _ in 0..64 {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            err = Some(e);
            break;
        }
    }
    drop(f);
    let err = err.expect("the limit stopped the writes");
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    // Another snapshot is not affected.
    let other = mount_dir(&prepare(&mut c, "other", "").await.unwrap());
    write_pattern(&other.join("f"), 16 * MIB, 3);
    // The limited snapshot still commits (cowsnap itself writes nothing in
    // it) or says clearly why not.
    match commit(&mut c, "layer", "ctr").await {
        Ok(()) => {
            let u = usage(&mut c, "layer").await.unwrap();
            assert!(u.size <= 9 * MIB as i64, "usage within the limit: {u:?}");
            remove(&mut c, "layer").await.unwrap();
        }
        Err(e) => {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
            remove(&mut c, "ctr").await.unwrap();
        }
    }
    commit(&mut c, "other-layer", "other").await.unwrap();
    drop(c);
    assert!(d.stop());
    assert_eq!(d.check_consistent(), (1, 1));
}
