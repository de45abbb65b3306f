//! Fixtures for the integration tests: a real btrfs on a loop device and a
//! cowsnap daemon (the built binary) serving on a socket in a temp dir.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowsnap::backend::Backend;
use cowsnap::backend::btrfs::BtrfsBackend;
use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use cowsnap::client;
use cowsnap::config::QuotaSetting;
use cowsnap::meta::MetaStore;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use cowsnap::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

/// A daemon on its own loop-backed btrfs.
pub struct Daemon {
    pub fs: LoopBtrfs,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    failpoints: String,
}

impl Daemon {
    /// Starts a daemon on a fresh filesystem.
    pub async fn start() -> Daemon {
        Self::start_with_failpoints("").await
    }

    /// Starts a daemon with `COWSNAP_FAILPOINTS` set to `spec`.
    pub async fn start_with_failpoints(spec: &str) -> Daemon {
        let fs = LoopBtrfs::new().expect("loop btrfs");
        let root = fs.path().join("root");
        let socket = fs.path().join("cowsnap.sock");
        let log = fs.path().join("daemon.log");
        let mut d = Daemon {
            fs,
            root,
            socket,
            log,
            child: None,
            failpoints: spec.to_owned(),
        };
        d.spawn().await;
        d
    }

    /// (Re)starts the daemon process on the same root.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
            .args(["serve", "--root"])
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--config")
            .arg("/dev/null")
            .env("RUST_LOG", "cowsnap=debug")
            .env("COWSNAP_FAILPOINTS", &self.failpoints)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cowsnap");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not listen:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets the failpoints used by the next spawn.
    pub fn set_failpoints(&mut self, spec: &str) {
        self.failpoints = spec.to_owned();
    }

    /// A client on the daemon's socket.
    pub async fn client(&self) -> SnapshotsClient<Channel> {
        client::connect(&self.socket).await.expect("connect")
    }

    /// Stops the daemon with SIGTERM and returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the daemon to die by itself (a crash failpoint) and
    /// returns its exit status description.
    pub fn wait_dead(&mut self) -> String {
        let mut child = self.child.take().expect("daemon running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.to_string();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not die");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Checks, with the daemon stopped, that every record has its object and
    /// every object its record. Returns (records, objects).
    pub fn check_consistent(&self) -> (usize, usize) {
        assert!(self.child.is_none(), "stop the daemon first");
        let meta = MetaStore::open(&self.root.join("metadata.redb")).expect("open metadata");
        let backend = BtrfsBackend::open(&self.root, QuotaSetting::Auto).expect("open backend");
        let records = meta.all().expect("records");
        let objects = backend.scan().expect("scan");
        let rec_ids: BTreeSet<u64> = records.iter().map(|(_, r)| r.id.0).collect();
        let obj_ids: BTreeSet<u64> = objects.iter().map(|o| o.id.0).collect();
        assert_eq!(
            rec_ids,
            obj_ids,
            "records and objects differ:\n{}",
            self.log_text()
        );
        for (key, r) in &records {
            let o = objects.iter().find(|o| o.id == r.id).unwrap();
            assert_eq!(o.area, r.kind, "{key}: object in the wrong area");
            assert_eq!(
                o.readonly,
                r.kind != cowsnap::model::Kind::Active,
                "{key}: wrong flag"
            );
            if let Some(p) = &r.parent {
                let parent = records.iter().find(|(k, _)| k == p);
                assert!(parent.is_some(), "{key}: parent {p} missing");
            }
        }
        (records.len(), objects.len())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log_text());
        }
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Vec<cowsnap::proto::containerd::types::Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "cowsnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: Default::default(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn view(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Vec<cowsnap::proto::containerd::types::Mount>, tonic::Status> {
    c.view(pb::ViewSnapshotRequest {
        snapshotter: "cowsnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: Default::default(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn commit(
    c: &mut SnapshotsClient<Channel>,
    name: &str,
    key: &str,
) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "cowsnap".into(),
        name: name.into(),
        key: key.into(),
        labels: Default::default(),
        parent: String::new(),
    })
    .await
    .map(|_| ())
}

pub async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "cowsnap".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

pub async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: "cowsnap".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.expect("info"))
}

pub async fn usage(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
) -> Result<pb::UsageResponse, tonic::Status> {
    c.usage(pb::UsageRequest {
        snapshotter: "cowsnap".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn list(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<Vec<pb::Info>, tonic::Status> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "cowsnap".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.info);
    }
    Ok(out)
}

pub async fn cleanup(c: &mut SnapshotsClient<Channel>) -> Result<(), tonic::Status> {
    c.cleanup(pb::CleanupRequest {
        snapshotter: "cowsnap".into(),
    })
    .await
    .map(|_| ())
}

/// The directory a bind mount of a snapshot exposes.
pub fn mount_dir(mounts: &[cowsnap::proto::containerd::types::Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "one mount expected: {mounts:?}");
    assert_eq!(mounts[0].r#type, "bind");
    PathBuf::from(&mounts[0].source)
}

/// Writes `len` bytes of a repeatable pattern to `path`.
pub fn write_pattern(path: &Path, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(path, data).unwrap();
}

/// Whether `path` holds exactly the pattern written by [`write_pattern`].
pub fn has_pattern(path: &Path, len: usize, seed: u8) -> bool {
    let want: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::read(path).map(|d| d == want).unwrap_or(false)
}
