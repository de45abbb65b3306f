//! The crash protocol of docs/design.md, point by point: the daemon is
//! killed (SIGKILL) at each failpoint, restarted, and must come back
//! consistent (every record has its subvolume and every subvolume its
//! record) without losing anything it acknowledged.
//! Needs `--features failpoints` and root.
#![cfg(feature = "failpoints")]

mod common;

use common::*;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use tonic::Code;

/// Starts a daemon with a committed `base` (holding a known file) and an
/// active `work` on it (holding another), then restarts it with `spec`.
async fn setup(spec: &str) -> Daemon {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    let dir = mount_dir(&prepare(&mut c, "base-x", "").await.unwrap());
    write_pattern(&dir.join("base"), 300_000, 1);
    commit(&mut c, "base", "base-x").await.unwrap();
    let dir = mount_dir(&prepare(&mut c, "work", "base").await.unwrap());
    write_pattern(&dir.join("work"), 200_000, 2);
    drop(c);
    assert!(d.stop());
    d.set_failpoints(spec);
    d.spawn().await;
    d
}

/// Runs `op`, expects the daemon to die, restarts it without failpoints,
/// checks consistency and returns a fresh client.
async fn crash_and_restart<F, Fut>(d: &mut Daemon, op: F)
where
    F: FnOnce(
        cowsnap::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient<
            tonic::transport::Channel,
        >,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let c = d.client().await;
    let res = op(c).await;
    assert!(res.is_err(), "the call must not be acknowledged");
    let status = d.wait_dead();
    assert!(
        status.contains("signal: 9"),
        "killed by the failpoint: {status}"
    );
    d.check_consistent_after_repair().await;
}

trait RepairCheck {
    async fn check_consistent_after_repair(&mut self);
}

impl RepairCheck for Daemon {
    async fn check_consistent_after_repair(&mut self) {
        self.set_failpoints("");
        self.spawn().await;
        assert!(self.stop(), "clean stop after repair");
        self.check_consistent();
        self.spawn().await;
    }
}

/// Checks that base and work are intact.
async fn assert_base_and_work_intact(d: &Daemon) {
    let mut c = d.client().await;
    let v = mount_dir(&view(&mut c, "check-base", "base").await.unwrap());
    assert!(
        has_pattern(&v.join("base"), 300_000, 1),
        "committed base intact"
    );
    remove(&mut c, "check-base").await.unwrap();
    let w = mount_dir(&mounts(&mut c, "work").await.unwrap());
    assert!(
        has_pattern(&w.join("work"), 200_000, 2),
        "active work intact"
    );
}

#[tokio::test]
async fn crash_after_create_fs_step_leaves_no_orphan() {
    let mut d = setup("create.after_fs=crash").await;
    crash_and_restart(&mut d, |mut c| async move {
        prepare(&mut c, "new", "base").await.map(|_| ())
    })
    .await;
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "new").await.unwrap_err().code(),
        Code::NotFound
    );
    prepare(&mut c, "new", "base").await.unwrap();
    assert_base_and_work_intact(&d).await;
}

#[tokio::test]
async fn crash_after_create_meta_step_keeps_the_snapshot() {
    let mut d = setup("create.after_meta=crash").await;
    crash_and_restart(&mut d, |mut c| async move {
        view(&mut c, "new", "base").await.map(|_| ())
    })
    .await;
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "new").await.unwrap().kind,
        pb::Kind::View as i32
    );
    assert_eq!(
        view(&mut c, "new", "base").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_base_and_work_intact(&d).await;
}

#[tokio::test]
async fn crash_after_commit_fs_step_rolls_back_to_active() {
    let mut d = setup("commit.after_fs=crash").await;
    crash_and_restart(&mut d, |mut c| async move {
        commit(&mut c, "layer", "work").await
    })
    .await;
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "layer").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        stat(&mut c, "work").await.unwrap().kind,
        pb::Kind::Active as i32
    );
    assert_base_and_work_intact(&d).await;
    // The rolled-back snapshot is writable and commits normally.
    let w = mount_dir(&mounts(&mut c, "work").await.unwrap());
    std::fs::write(w.join("extra"), b"x").unwrap();
    commit(&mut c, "layer", "work").await.unwrap();
}

#[tokio::test]
async fn crash_inside_commit_fs_step_rolls_back_to_active() {
    // Renamed into the committed area, read-only flag not yet set.
    let mut d = setup("commit.after_rename=crash").await;
    crash_and_restart(&mut d, |mut c| async move {
        commit(&mut c, "layer", "work").await
    })
    .await;
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "layer").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        stat(&mut c, "work").await.unwrap().kind,
        pb::Kind::Active as i32
    );
    assert!(
        d.log_text().contains("repair: moving object"),
        "repair moved it back"
    );
    assert_base_and_work_intact(&d).await;
    commit(&mut c, "layer", "work").await.unwrap();
}

#[tokio::test]
async fn crash_after_commit_meta_step_keeps_the_commit() {
    let mut d = setup("commit.after_meta=crash").await;
    crash_and_restart(&mut d, |mut c| async move {
        commit(&mut c, "layer", "work").await
    })
    .await;
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "work").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        stat(&mut c, "layer").await.unwrap().kind,
        pb::Kind::Committed as i32
    );
    let v = mount_dir(&view(&mut c, "check", "layer").await.unwrap());
    assert!(has_pattern(&v.join("work"), 200_000, 2));
    assert!(has_pattern(&v.join("base"), 300_000, 1));
}

#[tokio::test]
async fn crash_after_remove_meta_step_destroys_the_orphan() {
    let mut d = setup("remove.after_meta=crash").await;
    crash_and_restart(&mut d, |mut c| async move { remove(&mut c, "work").await }).await;
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "work").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(list(&mut c, &[]).await.unwrap().len(), 1);
}

#[tokio::test]
async fn crash_after_remove_fs_step_is_complete() {
    let mut d = setup("remove.after_fs=crash").await;
    if backend_is_zfs() {
        crash_and_restart(&mut d, |mut c| async move { remove(&mut c, "work").await }).await;
    } else {
        // btrfs destroys in the background after the reply: the kill comes
        // after the answer or races it.
        let mut c = d.client().await;
        let _ = remove(&mut c, "work").await;
        let status = d.wait_dead();
        assert!(
            status.contains("signal: 9"),
            "killed by the failpoint: {status}"
        );
        d.check_consistent_after_repair().await;
        assert!(
            !d.log_text().contains("destroyed orphan"),
            "the object was destroyed before the crash"
        );
    }
    let mut c = d.client().await;
    assert_eq!(
        stat(&mut c, "work").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(list(&mut c, &[]).await.unwrap().len(), 1);
}

#[tokio::test]
async fn failed_steps_are_undone_without_a_restart() {
    // An error (not a crash) after the filesystem step: the core undoes it
    // before answering, so nothing is left for repair.
    for spec in [
        "create.after_fs=error",
        "commit.after_rename=error",
        "commit.after_fs=error",
    ] {
        let mut d = setup(spec).await;
        let mut c = d.client().await;
        if spec.starts_with("create") {
            assert_eq!(
                prepare(&mut c, "new", "base").await.unwrap_err().code(),
                Code::Internal
            );
            assert_eq!(
                stat(&mut c, "new").await.unwrap_err().code(),
                Code::NotFound
            );
        } else {
            assert_eq!(
                commit(&mut c, "layer", "work").await.unwrap_err().code(),
                Code::Internal
            );
            assert_eq!(
                stat(&mut c, "layer").await.unwrap_err().code(),
                Code::NotFound
            );
        }
        assert_eq!(
            stat(&mut c, "work").await.unwrap().kind,
            pb::Kind::Active as i32
        );
        drop(c);
        assert!(d.stop());
        // Consistent as left, before any repair could run.
        d.check_consistent();
        d.set_failpoints("");
        d.spawn().await;
        assert!(
            d.log_text().contains("metadata and filesystem agree"),
            "{}",
            d.log_text()
        );
        assert_base_and_work_intact(&d).await;
    }
}

#[test]
fn every_failpoint_has_a_test() {
    let src = include_str!("crash.rs");
    for p in cowsnap::failpoint::POINTS {
        assert!(
            src.contains(&format!("\"{p}=")),
            "no test arms failpoint {p}"
        );
    }
}
