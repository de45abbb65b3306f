//! The end-to-end fixture: a loop-backed btrfs, a cowsnap daemon and a
//! containerd of the test's own, all under one temp dir
//! (`/var/tmp/cowsnap-e2e.<pid>.<nanos>`): containerd's config, root, state
//! and sockets, runc's state, ctr's fifos and the logs; ctr works in a
//! namespace of the run's own. Commands run with a time limit. Teardown is
//! `cleanup::remove_run`, which needs only the dir and the namespace.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use cowsnap::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

use crate::cleanup::{self, RunContainerd};

/// The containerd namespace of the run with process id `pid`. One per run:
/// ctr puts a container's cgroup at `/<namespace>/<container>`, and
/// teardown kills whatever is left in the namespace's cgroups, which must
/// not reach another run's containers.
pub fn namespace_of(pid: u32) -> String {
    format!("cowsnap-e2e-{pid}")
}
/// Name of the proxy snapshotter in containerd's config.
pub const SNAPSHOTTER: &str = "cowsnap";
/// Limit for one command (ctr, a container run, btrfs).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// A containerd release the test runs against: where its binaries are
/// and which config form it reads.
#[derive(Clone, Debug)]
pub struct Release {
    /// "1.6", "1.7", "2.x": for messages.
    pub name: &'static str,
    /// Dir of containerd, ctr and containerd-shim-runc-v2; None = the
    /// host's (on PATH: Debian bookworm's 1.6).
    pub bin_dir: Option<PathBuf>,
    /// containerd's config `version`: 2 for 1.x, 3 for 2.x.
    pub config_version: u32,
}

impl Release {
    /// The host's containerd (Debian bookworm: 1.6), config version 2.
    pub fn host() -> Release {
        Release {
            name: "1.6",
            bin_dir: None,
            config_version: 2,
        }
    }

    /// A release unpacked by hack/containerd-releases under the cache dir
    /// (`containerd-<prefix>*`, the newest if several); panics, saying how
    /// to fetch it, when it is not there.
    pub fn cached(name: &'static str, prefix: &str, config_version: u32) -> Release {
        let cache =
            std::env::var("COWSNAP_E2E_CACHE").unwrap_or_else(|_| "/var/cache/cowsnap-test".into());
        let want = format!("containerd-{prefix}");
        let mut found: Vec<PathBuf> = fs::read_dir(&cache)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&want))
                    .map(|e| e.path().join("usr/bin"))
                    .filter(|b| b.join("containerd").is_file())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        let Some(bin_dir) = found.pop() else {
            panic!(
                "containerd {name} not found under {cache}/{want}*/usr/bin: \
                 run hack/containerd-releases (hack/test does)"
            );
        };
        Release {
            name,
            bin_dir: Some(bin_dir),
            config_version,
        }
    }

    /// The path of one of the release's programs.
    fn program(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code (-1 if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// The fixture. Its methods panic with context on failure; Drop tears
/// everything down and reports anything it could not remove.
pub struct Env {
    pub dir: PathBuf,
    /// The containerd namespace every ctr call uses.
    pub ns: String,
    fs: Option<LoopBtrfs>,
    /// The btrfs mount point (top-level subvolume).
    pub mnt: PathBuf,
    /// cowsnap's root, a plain directory on the btrfs.
    pub root: PathBuf,
    pub cowsnap_sock: PathBuf,
    pub containerd_sock: PathBuf,
    containerd_config: PathBuf,
    pub cowsnap_log: PathBuf,
    pub containerd_log: PathBuf,
    /// The containerd release under test.
    pub release: Release,
    cowsnap: Option<Child>,
    containerd: Option<Child>,
    run_before: RunContainerd,
    started: Instant,
    torn_down: bool,
}

impl Env {
    /// Creates the temp dir and the btrfs (a sparse 4 GiB image), and
    /// writes containerd's config. Nothing is started yet.
    pub fn new(started: Instant, release: Release) -> Env {
        for (stale, pid) in cleanup::stale_runs() {
            eprintln!(
                "e2e: removing the leftovers of a dead run: {}",
                stale.display()
            );
            let run_before = RunContainerd::load(&stale);
            for problem in
                cleanup::remove_run(&stale, &namespace_of(pid), None, run_before.as_ref())
            {
                eprintln!("e2e:   {problem}");
            }
        }
        // containerd's shims double-fork away from containerd: as a
        // subreaper this process inherits them (instead of pid 1) and can
        // reap them at teardown, so not even a zombie is left.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!(
                "e2e: cannot become a child subreaper ({e}); exited shims are pid 1's to reap"
            );
        }
        let run_before = RunContainerd::snapshot();
        let dir = cleanup::create_run_dir();
        run_before.save(&dir);
        let fs = LoopBtrfs::new_in(&dir, 4 << 30).unwrap_or_else(|e| {
            let ns = namespace_of(std::process::id());
            let _ = cleanup::remove_run(&dir, &ns, None, Some(&run_before));
            panic!("making a loop btrfs in {}: {e}", dir.display())
        });
        let mnt = fs.path().to_owned();
        let mut env = Env {
            root: mnt.join("root"),
            mnt,
            fs: Some(fs),
            cowsnap_sock: dir.join("cowsnap.sock"),
            containerd_sock: dir.join("containerd.sock"),
            containerd_config: dir.join("containerd.toml"),
            cowsnap_log: dir.join("cowsnap.log"),
            containerd_log: dir.join("containerd.log"),
            release,
            dir,
            ns: namespace_of(std::process::id()),
            cowsnap: None,
            containerd: None,
            run_before,
            started,
            torn_down: false,
        };
        env.write_containerd_config();
        env
    }

    /// Time since the test started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// A cleanup for a signal handler: everything under the temp dir, by
    /// path (the fixture itself cannot be reached from there).
    pub fn interrupt_cleanup(&self) -> impl FnOnce() + Send + 'static {
        let dir = self.dir.clone();
        let ns = self.ns.clone();
        let run_before = self.run_before.clone();
        move || {
            eprintln!(
                "e2e: interrupted; removing everything under {}",
                dir.display()
            );
            let problems = cleanup::remove_run(&dir, &ns, None, Some(&run_before));
            cleanup::reap_children();
            for p in problems {
                eprintln!("e2e: teardown: {p}");
            }
        }
    }

    /// Prints a progress line with the time since the start.
    pub fn progress(&self, msg: impl std::fmt::Display) {
        eprintln!("e2e [{:6.1}s] {msg}", self.started.elapsed().as_secs_f64());
    }

    fn write_containerd_config(&mut self) {
        let d = self.dir.display();
        // version 2 is the config form of containerd 1.6/1.7, version 3 of
        // 2.x. Only what this test needs: no CRI (no Kubernetes here), no
        // snapshotter that would probe the host's filesystems; everything
        // in the temp dir.
        let v3 = self.release.config_version >= 3;
        // 2.x split CRI into several plugins.
        let cri = if v3 {
            "\"io.containerd.grpc.v1.cri\",\n  \"io.containerd.cri.v1.images\",\n  \"io.containerd.cri.v1.runtime\","
        } else {
            "\"io.containerd.grpc.v1.cri\","
        };
        // 2.x: the transfer service (ctr images import) unpacks only into
        // the snapshotters listed, and ctr passes the uid/gid mapping
        // labels only to a snapshotter that declares "remap-ids".
        let v3_extra = if v3 {
            format!(
                r#"  capabilities = ["remap-ids"]

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux"
  snapshotter = "{SNAPSHOTTER}"
"#
            )
        } else {
            String::new()
        };
        let config = format!(
            r#"version = {version}
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = [
  {cri}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

# The opt plugin creates its dir (/opt/containerd by default) at startup.
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[proxy_plugins.{SNAPSHOTTER}]
  type = "snapshot"
  address = "{sock}"
{v3_extra}"#,
            version = self.release.config_version,
            sock = self.cowsnap_sock.display()
        );
        fs::write(&self.containerd_config, config).expect("writing containerd.toml");
        // The parent of containerd's root and state. containerd would make
        // it 0700 (as it makes its root); a user-namespaced container's
        // root (a mapped host id) must traverse it to reach its rootfs in
        // the state dir, as it traverses /run/containerd (0711) on a host.
        let parent = self.dir.join("containerd");
        fs::create_dir(&parent).expect("creating containerd's dir");
        fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .expect("chmod containerd's dir");
    }

    /// Starts cowsnap on the btrfs and waits until it accepts connections.
    pub fn start_cowsnap(&mut self) {
        assert!(self.cowsnap.is_none(), "cowsnap already running");
        let log = append(&self.cowsnap_log);
        let child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
            .arg("serve")
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.cowsnap_sock)
            .arg("--config")
            .arg("/dev/null")
            .env("RUST_LOG", "cowsnap=debug,info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning cowsnap");
        self.cowsnap = Some(child);
        let sock = self.cowsnap_sock.clone();
        self.wait_until("cowsnap to listen", Duration::from_secs(30), |env| {
            if let Some(status) = env
                .cowsnap
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("cowsnap exited at startup with {status}\n{}", env.logs());
            }
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    /// The running cowsnap's pid.
    pub fn cowsnap_pid(&self) -> Option<u32> {
        self.cowsnap.as_ref().map(Child::id)
    }

    /// Stops cowsnap with SIGTERM; returns its exit status.
    pub fn stop_cowsnap(&mut self) -> ExitStatus {
        let child = self.cowsnap.take().expect("cowsnap is not running");
        stop_child(child, "cowsnap", Duration::from_secs(30))
    }

    /// Starts containerd with the test's config and waits until ctr gets
    /// an answer.
    pub fn start_containerd(&mut self) {
        assert!(self.containerd.is_none(), "containerd already running");
        let log = append(&self.containerd_log);
        let mut cmd = Command::new(self.release.program("containerd"));
        // containerd finds its shim (containerd-shim-runc-v2) on PATH: the
        // release's own first.
        if let Some(bin) = &self.release.bin_dir {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![bin.clone()];
            dirs.extend(std::env::split_paths(&path));
            cmd.env(
                "PATH",
                std::env::join_paths(dirs).expect("PATH without separators"),
            );
        }
        let child = cmd
            .arg("--config")
            .arg(&self.containerd_config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning containerd (install it with hack/deps --test)");
        self.containerd = Some(child);
        self.wait_until("containerd to answer", Duration::from_secs(60), |env| {
            if let Some(status) = env
                .containerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("containerd exited at startup with {status}\n{}", env.logs());
            }
            env.ctr(&["version"]).status.success()
        });
    }

    /// The running containerd's pid.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(Child::id)
    }

    /// Stops containerd with SIGTERM (its shims and their containers keep
    /// running, as on a real host); returns its exit status.
    pub fn stop_containerd(&mut self) -> ExitStatus {
        let child = self.containerd.take().expect("containerd is not running");
        stop_child(child, "containerd", Duration::from_secs(30))
    }

    /// Calls `f` every 100 ms until it returns true; panics after `limit`.
    pub fn wait_until(&mut self, what: &str, limit: Duration, mut f: impl FnMut(&mut Env) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs ctr against the test's containerd, in the test's namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.release.program("ctr"));
        cmd.arg("--address")
            .arg(&self.containerd_sock)
            .args(["--namespace", &self.ns])
            .args(args);
        run(cmd, COMMAND_TIMEOUT)
    }

    /// Runs ctr and returns its stdout; panics with its stderr and the
    /// logs if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        if !out.status.success() {
            panic!(
                "ctr {} failed ({}):\nstdout: {}\nstderr: {}\n{}",
                args.join(" "),
                out.status,
                out.stdout.trim(),
                out.stderr.trim(),
                self.logs()
            );
        }
        out.stdout
    }

    /// `ctr snapshots --snapshotter cowsnap ARGS...`
    pub fn snapshots_ok(&self, args: &[&str]) -> String {
        let mut all = vec!["snapshots", "--snapshotter", SNAPSHOTTER];
        all.extend_from_slice(args);
        self.ctr_ok(&all)
    }

    /// `ctr run ARGS...` with runc's state and ctr's fifos in the temp dir
    /// (not in /run/containerd), and cowsnap as the snapshotter unless
    /// `default_snapshotter` (then the namespace's default applies).
    pub fn ctr_run(&self, args: &[&str], default_snapshotter: bool) -> Output {
        let runc_root = self.dir.join("runc").display().to_string();
        let fifo_dir = self.dir.join("fifo").display().to_string();
        let mut all = vec!["run", "--runc-root", &runc_root, "--fifo-dir", &fifo_dir];
        if !default_snapshotter {
            all.extend(["--snapshotter", SNAPSHOTTER]);
        }
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// Runs a tool other than ctr and returns its stdout; panics on failure.
    pub fn tool_ok(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let out = run(cmd, COMMAND_TIMEOUT);
        if !out.status.success() {
            panic!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                out.stderr.trim()
            );
        }
        out.stdout
    }

    /// A client on cowsnap's socket (a new connection each time: cowsnap
    /// restarts during the test).
    pub async fn client(&self) -> SnapshotsClient<Channel> {
        cowsnap::client::connect(&self.cowsnap_sock)
            .await
            .unwrap_or_else(|e| panic!("connecting to cowsnap: {e}\n{}", self.logs()))
    }

    /// Every snapshot cowsnap has, asked directly (not through containerd).
    pub async fn cowsnap_list(&self) -> Vec<pb::Info> {
        let mut c = self.client().await;
        let mut stream = c
            .list(pb::ListSnapshotsRequest {
                snapshotter: SNAPSHOTTER.into(),
                filters: vec![],
            })
            .await
            .expect("cowsnap List")
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await.expect("cowsnap List stream") {
            out.extend(batch.info);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Usage of `key`, asked directly.
    pub async fn cowsnap_usage(&self, key: &str) -> pb::UsageResponse {
        let mut c = self.client().await;
        c.usage(pb::UsageRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("cowsnap Usage {key}: {e}"))
        .into_inner()
    }

    /// Stat of `key`, asked directly.
    pub async fn cowsnap_stat(&self, key: &str) -> pb::Info {
        let mut c = self.client().await;
        c.stat(pb::StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("cowsnap Stat {key}: {e}"))
        .into_inner()
        .info
        .expect("Stat answered without info")
    }

    /// Mounts of `key`, asked directly.
    pub async fn cowsnap_mounts(&self, key: &str) -> Vec<cowsnap::proto::containerd::types::Mount> {
        let mut c = self.client().await;
        c.mounts(pb::MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("cowsnap Mounts {key}: {e}"))
        .into_inner()
        .mounts
    }

    /// Calls Cleanup directly.
    pub async fn cowsnap_cleanup(&self) {
        let mut c = self.client().await;
        c.cleanup(pb::CleanupRequest {
            snapshotter: SNAPSHOTTER.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("cowsnap Cleanup: {e}\n{}", self.logs()));
    }

    /// The names in one of cowsnap's areas (`active`, `view`, `committed`).
    pub fn area(&self, name: &str) -> BTreeSet<String> {
        let dir = self.root.join(name);
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Paths (relative to the mount) of every subvolume on the btrfs,
    /// from `btrfs subvolume list`.
    pub fn subvolumes(&self) -> BTreeSet<String> {
        let mnt = self.mnt.display().to_string();
        self.tool_ok("btrfs", &["subvolume", "list", &mnt])
            .lines()
            .filter_map(|l| l.split(" path ").nth(1))
            .map(str::to_owned)
            .collect()
    }

    /// The tail of both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (name, path) in [
            ("cowsnap", &self.cowsnap_log),
            ("containerd", &self.containerd_log),
        ] {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| name == "cowsnap" || !l.contains("level=info"))
                .collect();
            let from = lines.len().saturating_sub(25);
            let _ = writeln!(
                s,
                "--- last lines of the {name} log ({}) ---",
                path.display()
            );
            for l in &lines[from..] {
                let _ = writeln!(s, "{l}");
            }
        }
        s
    }

    /// Stops everything gracefully, then removes whatever is left. Returns
    /// what could not be removed (empty when the host is as before).
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return vec![];
        }
        self.torn_down = true;
        // Gracefully first: cowsnap closes its metadata, containerd its db.
        if let Some(c) = self.containerd.take() {
            stop_child(c, "containerd", Duration::from_secs(10));
        }
        if let Some(c) = self.cowsnap.take() {
            stop_child(c, "cowsnap", Duration::from_secs(10));
        }
        let fs = self.fs.take();
        let problems = cleanup::remove_run(&self.dir, &self.ns, fs, Some(&self.run_before));
        cleanup::reap_children();
        problems
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if thread::panicking() {
            eprintln!("e2e: failed; logs are below, tearing down\n{}", self.logs());
        }
        let problems = self.teardown();
        if problems.is_empty() {
            eprintln!("e2e: teardown left nothing behind");
        }
        for p in problems {
            eprintln!("e2e: teardown: {p}");
        }
    }
}

fn append(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop_child(mut child: Child, name: &str, grace: Duration) -> ExitStatus {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                eprintln!("e2e: {name} did not stop within {grace:?}; killing it");
                let _ = child.kill();
                return child.wait().expect("waiting for a killed child");
            }
        }
    }
}

/// Runs `cmd` with stdin closed, capturing its output; kills it after
/// `limit` and panics.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|r| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    })
    .collect();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a command") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut texts = readers.into_iter().map(|h| h.join().unwrap_or_default());
    Output {
        status,
        stdout: texts.next().unwrap_or_default(),
        stderr: texts.next().unwrap_or_default(),
    }
}
