//! Fixtures for the integration tests: a real btrfs on a loop device and a
//! cowsnap daemon (the built binary) serving on a socket in a temp dir.
//! With `COWSNAP_TEST_BACKEND=zfs` (and `COWSNAP_TEST_ZPOOL`, see
//! hack/vm-test) [`Daemon::start`] runs the daemon on the ZFS backend
//! instead, with its datasets under a scratch dataset of that pool; the
//! loop btrfs then holds only its root (metadata), socket and log.
#![allow(dead_code)]

pub mod raw;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowsnap::backend::Backend;
use cowsnap::backend::btrfs::BtrfsBackend;
use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use cowsnap::backend::zfs::ZfsBackend;
use cowsnap::backend::zfs::testutil::{ZfsMount, ZfsScratch};
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
    /// With `COWSNAP_TEST_BACKEND=zfs`: the dataset the daemon keeps its
    /// datasets under (the root then holds only the metadata).
    zfs: Option<ZfsScratch>,
    /// Top-level settings added to the daemon's config file (e.g.
    /// `metrics_address = "..."`), whichever the backend.
    pub extra_config: String,
}

impl Daemon {
    /// Starts a daemon on a fresh filesystem.
    pub async fn start() -> Daemon {
        Self::start_with_failpoints("").await
    }

    /// Starts a daemon with `COWSNAP_FAILPOINTS` set to `spec`.
    pub async fn start_with_failpoints(spec: &str) -> Daemon {
        let fs = LoopBtrfs::new().expect("loop btrfs");
        let mut d = Daemon::on(fs, spec);
        d.use_backend_from_env();
        d.spawn().await;
        d
    }

    /// Starts a daemon on `fs` (e.g. a small filesystem made with
    /// [`LoopBtrfs::new_in`]).
    pub async fn start_on(fs: LoopBtrfs) -> Daemon {
        let mut d = Daemon::on(fs, "");
        d.spawn().await;
        d
    }

    /// A fixture on `fs` whose daemon is not started yet.
    pub fn on(fs: LoopBtrfs, spec: &str) -> Daemon {
        let root = fs.path().join("root");
        let socket = fs.path().join("cowsnap.sock");
        let log = fs.path().join("daemon.log");
        Daemon {
            fs,
            root,
            socket,
            log,
            child: None,
            failpoints: spec.to_owned(),
            zfs: None,
            extra_config: String::new(),
        }
    }

    /// (Re)starts the daemon process on the same root.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let child = self.command().spawn().expect("spawn cowsnap");
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

    /// The daemon's command line, its stderr appended to the log.
    fn command(&self) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cowsnap"));
        cmd.args(["serve", "--root"])
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "cowsnap=debug")
            .env("COWSNAP_FAILPOINTS", &self.failpoints)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    /// Starts the daemon expecting it to refuse to start: waits for it to
    /// exit (panics if it serves instead) and returns its exit status and
    /// what it logged in this run.
    pub fn spawn_expect_exit(&mut self) -> (std::process::ExitStatus, String) {
        assert!(self.child.is_none(), "daemon already running");
        let before = self.log_text().len();
        let mut child = self.command().spawn().expect("spawn cowsnap");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline
                || std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon served instead of refusing to start:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = self.log_text();
        (status, log.get(before..).unwrap_or_default().to_owned())
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the daemon process is still running (not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("wait").is_none(),
            None => false,
        }
    }

    /// Kills the daemon with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
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
        let backend = self.backend();
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

/// What the metadata and the filesystem hold, compared record by record
/// (see [`Daemon::inventory`]). Every list should be empty.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Every record, in key order.
    pub records: Vec<(String, cowsnap::meta::Record)>,
    /// Records whose filesystem object is missing.
    pub dangling: Vec<String>,
    /// Objects no record owns: subvolumes of the filesystem (btrfs), or
    /// datasets, snapshots and bookmarks under the fixture's scratch
    /// dataset (ZFS) that are not the daemon's parent and area datasets or
    /// a committed object's origin snapshot. Nested subvolumes or datasets
    /// inside a recorded object belong to it.
    pub leaked: Vec<String>,
    /// Records whose object is in the wrong area or has the wrong
    /// read-only flag.
    pub misplaced: Vec<String>,
    /// Records whose parent is missing or not committed.
    pub bad_parent: Vec<String>,
}

impl Inventory {
    /// True when metadata and filesystem agree.
    pub fn is_clean(&self) -> bool {
        self.dangling.is_empty()
            && self.leaked.is_empty()
            && self.misplaced.is_empty()
            && self.bad_parent.is_empty()
    }
}

impl Daemon {
    /// Compares, with the daemon stopped, the metadata with every subvolume
    /// of the filesystem, without panicking, so callers can count.
    pub fn inventory(&self) -> Inventory {
        use cowsnap::backend::btrfs::ioctl::{SubvolId, child_subvolumes};
        use cowsnap::model::Kind;
        use std::os::fd::AsFd;
        assert!(self.child.is_none(), "stop the daemon first");
        let meta = MetaStore::open(&self.root.join("metadata.redb")).expect("open metadata");
        let backend = self.backend();
        let records = meta.all().expect("records");
        drop(meta);
        let objects = backend.scan().expect("scan");
        let subvols = if self.zfs.is_some() {
            Vec::new()
        } else {
            let top = std::fs::File::open(self.fs.path()).expect("open fs");
            child_subvolumes(top.as_fd(), SubvolId::TOP_LEVEL).expect("subvolumes")
        };
        let mut inv = Inventory::default();
        for (key, r) in &records {
            match objects.iter().find(|o| o.id == r.id) {
                None => inv.dangling.push(format!("{key:?} (id {})", r.id)),
                Some(o) => {
                    if o.area != r.kind || o.readonly != (r.kind != Kind::Active) {
                        inv.misplaced.push(format!(
                            "{key:?}: {} record, object in {} (read-only {})",
                            r.kind, o.area, o.readonly
                        ));
                    }
                    if o.native != r.object.native {
                        inv.misplaced.push(format!(
                            "{key:?}: record says subvolume {}, found {}",
                            r.object.native, o.native
                        ));
                    }
                }
            }
            if let Some(p) = &r.parent {
                match records.iter().find(|(k, _)| k == p) {
                    Some((_, pr)) if pr.kind == Kind::Committed && Some(pr.id) == r.parent_id => {}
                    Some((_, pr)) => inv
                        .bad_parent
                        .push(format!("{key:?}: parent {p:?} is {} id {}", pr.kind, pr.id)),
                    None => inv
                        .bad_parent
                        .push(format!("{key:?}: parent {p:?} missing")),
                }
            }
        }
        for o in &objects {
            if !records.iter().any(|(_, r)| r.id == o.id) {
                inv.leaked.push(format!("object {} in {}", o.id, o.area));
            }
        }
        for s in subvols {
            let owned = records.iter().any(|(_, r)| r.object.native == s.0);
            let scanned = objects.iter().any(|o| o.native == s.0);
            if !owned && !scanned {
                inv.leaked.push(format!("subvolume {s}"));
            }
        }
        if let Some(z) = &self.zfs {
            let found: BTreeSet<String> = objects
                .iter()
                .map(|o| format!("{}/{}", o.area, o.id))
                .collect();
            inv.leaked.extend(unexpected_datasets(z.dataset(), &found));
        }
        inv.records = records;
        inv
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
        if let Some(z) = &self.zfs {
            forget_zfs_mounts(z.dataset());
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

pub async fn mounts(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
) -> Result<Vec<cowsnap::proto::containerd::types::Mount>, tonic::Status> {
    c.mounts(pb::MountsRequest {
        snapshotter: String::new(),
        key: key.into(),
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
    release_mounts(c, key).await;
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
    release_mounts(c, key).await;
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

/// The directory holding a snapshot's files: a bind mount's source, or
/// (ZFS) a mount of the dataset, made once and kept until the snapshot is
/// committed or removed through [`commit`] or [`remove`], as containerd
/// unmounts before those calls.
pub fn mount_dir(mounts: &[cowsnap::proto::containerd::types::Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "one mount expected: {mounts:?}");
    let m = &mounts[0];
    if m.r#type == "zfs" {
        let mut held = zfs_mounts();
        if let Some((_, mount)) = held.iter().find(|(src, _)| *src == m.source) {
            return mount.path().to_owned();
        }
        let readonly = m.options.iter().any(|o| o == "ro");
        let mount = ZfsMount::new(&m.source, readonly).expect("mount dataset");
        let dir = mount.path().to_owned();
        held.push((m.source.clone(), mount));
        return dir;
    }
    assert_eq!(m.r#type, "bind");
    PathBuf::from(&m.source)
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

// --- backend selection (COWSNAP_TEST_BACKEND) ------------------------------

/// Whether the tests run against the ZFS backend
/// (`COWSNAP_TEST_BACKEND=zfs`; btrfs otherwise). hack/vm-test sets it in
/// its guest, with `COWSNAP_TEST_ZPOOL` naming the pool.
pub fn backend_is_zfs() -> bool {
    std::env::var("COWSNAP_TEST_BACKEND").is_ok_and(|b| b == "zfs")
}

/// `n` scaled by `COWSNAP_TEST_SCALE` (percent, default 100), at least
/// `min`: for loop counts whose size is not the point of a test.
/// hack/vm-test lowers it for ZFS under emulation, where every object
/// operation is a `zfs` command of a few tenths of a second.
pub fn scaled(n: usize, min: usize) -> usize {
    let percent = std::env::var("COWSNAP_TEST_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(100);
    (n * percent / 100).max(min)
}

/// The backend the tests run against, as the daemon names it in its status
/// (`btrfs` or `zfs`).
pub fn backend_name() -> &'static str {
    if backend_is_zfs() { "zfs" } else { "btrfs" }
}

/// Says that a test (or part of one) is skipped, and why: straight to
/// stderr, which the test harness does not capture, so it shows in the
/// output of passing runs too.
pub fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped {why}");
}

/// For tests of btrfs-only behaviour: true (and says so) on ZFS, where the
/// caller returns early.
pub fn skip_on_zfs(what: &str) -> bool {
    if backend_is_zfs() {
        say_skipped(&format!("on zfs: {what}"));
    }
    backend_is_zfs()
}

/// The options the backend puts on a snapshot's mount, writable or not.
pub fn base_options(writable: bool) -> Vec<String> {
    let mode = if writable { "rw" } else { "ro" };
    if backend_is_zfs() {
        vec![mode.into()]
    } else {
        vec!["rbind".into(), mode.into()]
    }
}

impl Daemon {
    /// Switches a fixture made by [`Daemon::on`] to the backend the
    /// environment asks for.
    /// With `COWSNAP_TEST_BACKEND=zfs`: makes the daemon keep its datasets
    /// under a scratch dataset of its own (before the first spawn).
    pub fn use_backend_from_env(&mut self) {
        if !backend_is_zfs() {
            return;
        }
        let scratch = ZfsScratch::new().expect("zfs scratch dataset").expect(
            "COWSNAP_TEST_BACKEND=zfs needs ZFS: set COWSNAP_TEST_ZPOOL (hack/vm-test does)",
        );
        self.zfs = Some(scratch);
    }

    /// The config file the daemon is started with: `extra_config`, then the
    /// backend's section (none for btrfs).
    fn config_path(&self) -> PathBuf {
        if self.zfs.is_none() && self.extra_config.is_empty() {
            return PathBuf::from("/dev/null");
        }
        let mut config = format!("{}\n", self.extra_config);
        if let Some(scratch) = &self.zfs {
            config.push_str(&format!(
                "backend = \"zfs\"\n[zfs]\ndataset = \"{}/cowsnap\"\n",
                scratch.dataset()
            ));
        }
        let path = self.fs.path().join("config.toml");
        std::fs::write(&path, config).expect("write the daemon's config");
        path
    }

    /// The parent dataset of a ZFS daemon.
    pub fn zfs_dataset(&self) -> Option<String> {
        self.zfs
            .as_ref()
            .map(|z| format!("{}/cowsnap", z.dataset()))
    }

    /// The daemon's backend, opened on its root or dataset (daemon stopped).
    pub fn backend(&self) -> Box<dyn Backend> {
        match self.zfs_dataset() {
            Some(ds) => Box::new(ZfsBackend::open(&ds).expect("open zfs backend")),
            None => {
                Box::new(BtrfsBackend::open(&self.root, QuotaSetting::Auto).expect("open backend"))
            }
        }
    }

    /// Makes an object in `area` (active, view, committed) behind cowsnap's
    /// back, as a crash or another tool would leave it.
    pub fn create_foreign_object(&self, area: &str, id: u64) {
        let ok = match self.zfs_dataset() {
            Some(ds) => Command::new("zfs")
                .args(["create", "-o", "mountpoint=legacy"])
                .arg(format!("{ds}/{area}/{id}"))
                .status(),
            None => Command::new("btrfs")
                .args(["-q", "subvolume", "create"])
                .arg(self.root.join(area).join(id.to_string()))
                .status(),
        };
        assert!(ok.expect("run").success(), "creating {area}/{id}");
    }

    /// Whether the object `area/id` exists.
    pub fn object_exists(&self, area: &str, id: u64) -> bool {
        match self.zfs_dataset() {
            Some(ds) => Command::new("zfs")
                .args(["list", "-H", "-o", "name"])
                .arg(format!("{ds}/{area}/{id}"))
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            None => self.root.join(area).join(id.to_string()).exists(),
        }
    }

    /// Asserts that `mounts` expose an object of `area`, named by its id.
    pub fn assert_mount_in_area(
        &self,
        mounts: &[cowsnap::proto::containerd::types::Mount],
        area: &str,
    ) {
        let source = &mounts[0].source;
        let prefix = self.area_prefix(area);
        let name = source
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{source} is not in {prefix}"));
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()),
            "{source}"
        );
    }

    /// Where the objects of `area` are: its directory (btrfs) or dataset
    /// (ZFS), followed by a slash.
    pub fn area_prefix(&self, area: &str) -> String {
        match self.zfs_dataset() {
            Some(ds) => format!("{ds}/{area}/"),
            None => format!("{}/", self.root.join(area).display()),
        }
    }

    /// Destroys the object `area/id` behind cowsnap's back, as an operator
    /// or another tool could (`btrfs subvolume delete`, `zfs destroy -r`),
    /// after dropping the mounts [`mount_dir`] made of it. With
    /// `with_clones` (ZFS only, where a committed dataset cannot go while
    /// clones of its snapshot exist) its clones go too (`zfs destroy -R`).
    pub fn destroy_object(&self, area: &str, id: u64, with_clones: bool) {
        let st = match self.zfs_dataset() {
            Some(ds) => {
                let dataset = format!("{ds}/{area}/{id}");
                if with_clones {
                    // Its clones may be mounted too: every mount of the
                    // daemon's datasets goes.
                    forget_zfs_mounts(&ds);
                } else {
                    forget_zfs_mounts(&dataset);
                }
                let flag = if with_clones { "-R" } else { "-r" };
                Command::new("zfs")
                    .args(["destroy", flag, &dataset])
                    .status()
            }
            None => Command::new("btrfs")
                .args(["-q", "subvolume", "delete"])
                .arg(self.root.join(area).join(id.to_string()))
                .status(),
        };
        assert!(st.expect("run").success(), "destroying {area}/{id}");
    }

    /// The files of object `area/id`, for reading with the daemon stopped
    /// (or not using it): its directory (btrfs), or a read-only mount of
    /// its dataset (ZFS) held by the returned guard.
    pub fn object_files(&self, area: &str, id: u64) -> ObjectFiles {
        match self.zfs_dataset() {
            Some(ds) => {
                let mount = ZfsMount::new(&format!("{ds}/{area}/{id}"), true)
                    .unwrap_or_else(|e| panic!("mount {area}/{id}: {e}"));
                ObjectFiles {
                    dir: mount.path().to_owned(),
                    _mount: Some(mount),
                }
            }
            None => ObjectFiles {
                dir: self.root.join(area).join(id.to_string()),
                _mount: None,
            },
        }
    }

    /// Drops every mount [`mount_dir`] made of this daemon's objects (ZFS;
    /// nothing to do on btrfs), e.g. after a kill left calls that would
    /// have released them unanswered.
    pub fn release_all_mounts(&self) {
        if let Some(z) = &self.zfs {
            forget_zfs_mounts(z.dataset());
        }
    }

    /// Makes the daemon hand out ids from `next` on (restarting it): an
    /// object with id `next - 1` made behind its back raises its id
    /// counter at startup, where repair then destroys it as an orphan.
    /// Far cheaper than creating `next` snapshots, on ZFS above all.
    /// Clients made before must be made again.
    pub async fn skip_ids_to(&mut self, next: u64) {
        assert!(self.stop(), "clean stop:\n{}", self.log_text());
        self.create_foreign_object("active", next - 1);
        self.spawn().await;
        assert!(!self.object_exists("active", next - 1), "orphan destroyed");
    }

    /// Makes usage figures current: ZFS updates `written` when a
    /// transaction group is synced.
    pub fn sync_usage(&self) {
        nix::unistd::sync();
        if let Some(ds) = self.zfs_dataset() {
            let pool = ds.split('/').next().unwrap_or_default().to_owned();
            let st = Command::new("zpool").args(["sync", &pool]).status();
            assert!(st.expect("zpool sync").success());
        }
    }
}

/// The files of an object, from [`Daemon::object_files`].
pub struct ObjectFiles {
    dir: PathBuf,
    _mount: Option<ZfsMount>,
}

impl ObjectFiles {
    /// The object's root directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Under the scratch dataset `scratch` (ZFS), everything the daemon should
/// not have: datasets, snapshots and bookmarks other than its parent
/// `scratch/cowsnap`, the area datasets, the objects in `found`
/// (`area/id`) with whatever nests in them, and committed objects' origin
/// snapshots.
fn unexpected_datasets(scratch: &str, found: &BTreeSet<String>) -> Vec<String> {
    let out = Command::new("zfs")
        .args(["list", "-H", "-p", "-o", "name", "-t", "all", "-r", scratch])
        .output()
        .expect("zfs list");
    assert!(
        out.status.success(),
        "zfs list -r {scratch}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parent = format!("{scratch}/cowsnap");
    let below = format!("{parent}/");
    let expected = |name: &str| {
        if name == scratch || name == parent {
            return true;
        }
        let Some(rest) = name.strip_prefix(&below) else {
            return false;
        };
        if ["active", "view", "committed"].contains(&rest) {
            return true;
        }
        // A snapshot (@) or bookmark (#) of a dataset.
        let (dataset, tag) = match rest.find(['@', '#']) {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let mut parts = dataset.splitn(3, '/');
        let (Some(area), Some(id)) = (parts.next(), parts.next()) else {
            return false;
        };
        let nested = parts.next().is_some();
        found.contains(&format!("{area}/{id}"))
            && match tag {
                None => true,
                Some(tag) => !nested && area == "committed" && tag == "@cowsnap",
            }
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|name| !expected(name))
        .map(|name| format!("dataset {name}"))
        .collect()
}

/// ZFS mounts made by [`mount_dir`]: (dataset, mount).
fn zfs_mounts() -> std::sync::MutexGuard<'static, Vec<(String, ZfsMount)>> {
    static HELD: std::sync::Mutex<Vec<(String, ZfsMount)>> = std::sync::Mutex::new(Vec::new());
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Unmounts what [`mount_dir`] mounted for `key` (ZFS), before a commit or
/// remove, as containerd does.
pub async fn release_mounts(c: &mut SnapshotsClient<Channel>, key: &str) {
    if zfs_mounts().is_empty() {
        return;
    }
    let Ok(r) = c
        .mounts(pb::MountsRequest {
            snapshotter: "cowsnap".into(),
            key: key.into(),
        })
        .await
    else {
        return;
    };
    let sources: Vec<String> = r
        .into_inner()
        .mounts
        .into_iter()
        .map(|m| m.source)
        .collect();
    let released: Vec<(String, ZfsMount)> = {
        let mut held = zfs_mounts();
        let (gone, kept) = held.drain(..).partition(|(src, _)| sources.contains(src));
        *held = kept;
        gone
    };
    drop(released);
}

/// Unmounts every mount [`mount_dir`] made of `dataset` or of datasets
/// below it.
fn forget_zfs_mounts(dataset: &str) {
    let below = format!("{dataset}/");
    let released: Vec<(String, ZfsMount)> = {
        let mut held = zfs_mounts();
        let (gone, kept) = held
            .drain(..)
            .partition(|(src, _)| src == dataset || src.starts_with(&below));
        *held = kept;
        gone
    };
    drop(released);
}
