//! End-to-end: cowsnap as containerd's snapshotter, with Debian's runc and
//! each containerd release users run: 1.6 (the host's, Debian bookworm),
//! 1.7 and 2.x (Debian trixie's and sid's packages, unpacked under
//! /var/cache/cowsnap-test by `hack/containerd-releases`), each started by
//! the test with its own config (`version = 2`, or `version = 3` for 2.x),
//! root, state and sockets (see `e2e/harness.rs`), cowsnap on a
//! loop-backed btrfs. One test per release, run one after the other.
//!
//! No registry: `e2e/build-image.py` builds a three-layer OCI image (busybox;
//! thousands of small files with a hard link, a symlink and an xattr;
//! whiteouts and an opaque directory), cached under /var/cache/cowsnap-test.
//! The test imports and unpacks it with cowsnap, runs containers, drives
//! `ctr snapshots`, restarts each daemon while the other keeps running,
//! lets containerd's garbage collector remove everything and checks the
//! filesystem is empty again. Facts are checked through containerd and
//! directly against cowsnap (its socket, its root, `btrfs`). On 2.x it also
//! runs user-namespaced containers (`ctr run --uidmap --gidmap
//! --remap-labels`) with two mappings next to one without, and checks that
//! the layers are shared, not copied or chowned.
//!
//! Needs root, containerd, runc, btrfs-progs, python3 and apt (for the
//! busybox package and the other releases): `hack/test` runs it; alone:
//!
//! ```sh
//! hack/containerd-releases
//! cargo test --test e2e -- --ignored --nocapture
//! ```
//!
//! `COWSNAP_E2E_FAIL_AT=<stage>` makes the test fail on purpose at the
//! start of a stage (`import`, `containers`, `snapshots`, `restart-cowsnap`,
//! `restart-containerd`, `remap`, `gc`), to see that teardown leaves nothing
//! behind.

#[path = "e2e/cleanup.rs"]
mod cleanup;
#[path = "e2e/harness.rs"]
mod harness;
#[path = "e2e/observe.rs"]
mod observe;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use harness::{Env, Release};
use observe::{
    Image, build_image, by_ctr_key, committed_chain, ctr_key, data_used, get_xattr, parse_ls,
    parse_usage, subvolume_uuids,
};
use serde_json::Value;

/// Bytes the long-running container writes (and syncs) before it reports
/// ready: its snapshot's usage must show them.
const LIVE_WRITE_MIB: u64 = 16;

/// Figures reported at the end.
#[derive(Default)]
struct Figures {
    stages: Vec<(&'static str, f64)>,
    max_snapshots: usize,
    layer_usage: Vec<(u64, u64)>,
    live_usage: u64,
    live_inodes: u64,
    data_used: [u64; 3],
    cowsnap_reconnect: f64,
    gc_seconds: f64,
    checks: usize,
}

/// One release at a time: the runs share the process's containerd
/// namespace name (teardown kills its cgroups) and /run/containerd.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd and runc: run by hack/test, or `cargo test --test e2e -- --ignored --nocapture`"]
async fn containerd_1_6_runs_containers_on_cowsnap_and_gc_empties_the_filesystem() {
    scenario(Release::host()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, runc and containerd 1.7 (hack/containerd-releases): run by hack/test"]
async fn containerd_1_7_runs_containers_on_cowsnap_and_gc_empties_the_filesystem() {
    scenario(Release::cached("1.7", "1.7.", 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, runc and containerd 2.x (hack/containerd-releases): run by hack/test"]
async fn containerd_2_runs_containers_and_user_namespaced_ones_on_shared_layers() {
    scenario(Release::cached("2.x", "2.", 3)).await;
}

/// The whole scenario against one release; the user-namespace stage only
/// where containerd mounts a snapshotter's `uidmap=`/`gidmap=` mounts
/// idmapped (2.x).
async fn scenario(release: Release) {
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let image = build_image();
    let remap = release.config_version >= 3;
    let env = Env::new(started, release);
    let cleanup = env.interrupt_cleanup();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        cleanup();
        std::process::exit(130);
    });
    env.progress(format!(
        "containerd {}: temp dir {}",
        env.release.name,
        env.dir.display()
    ));
    let mut t = T {
        env,
        image,
        fig: Figures::default(),
        stage: None,
    };

    t.stage("setup");
    t.setup().await;
    t.stage("import");
    t.import().await;
    t.stage("containers");
    t.containers().await;
    t.stage("snapshots");
    t.snapshot_commands().await;
    t.stage("restart-cowsnap");
    t.restart_cowsnap().await;
    t.stage("restart-containerd");
    t.restart_containerd().await;
    if remap {
        t.stage("remap");
        t.user_namespaces().await;
    } else {
        t.env.progress(format!(
            "remap: skipped: containerd {} does not mount `uidmap=` mounts idmapped \
             (2.x does)",
            t.env.release.name
        ));
    }
    t.stage("gc");
    t.garbage_collection().await;
    t.stage("shutdown");
    t.shutdown().await;
    t.stage("");
    t.report();
}

/// The test's state: the fixture, the image and the figures.
struct T {
    env: Env,
    image: Image,
    fig: Figures,
    /// The stage running and when it began.
    stage: Option<(&'static str, Instant)>,
}

impl T {
    /// Ends the current stage (recording its time) and begins `name` ("" =
    /// none); fails on purpose if COWSNAP_E2E_FAIL_AT names it.
    fn stage(&mut self, name: &'static str) {
        if let Some((prev, t0)) = self.stage.take() {
            self.fig.stages.push((prev, t0.elapsed().as_secs_f64()));
        }
        if name.is_empty() {
            return;
        }
        self.env.progress(format!("== {name}"));
        if std::env::var("COWSNAP_E2E_FAIL_AT").is_ok_and(|v| v == name) {
            panic!("deliberate failure at stage {name} (COWSNAP_E2E_FAIL_AT)");
        }
        self.stage = Some((name, Instant::now()));
    }

    /// Counts a check; panics with `what` and the daemons' logs if false.
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.fig.checks += 1;
        if !ok {
            panic!("check failed: {}\n{}", what(), self.env.logs());
        }
    }

    fn check_eq<V: PartialEq + std::fmt::Debug>(&mut self, got: V, want: V, what: &str) {
        let ok = got == want;
        self.check(ok, || format!("{what}: got {got:?}, want {want:?}"));
    }

    fn top(&self) -> String {
        self.image.chain_ids.last().expect("chain ids").clone()
    }

    async fn setup(&mut self) {
        self.env.start_cowsnap();
        self.env.start_containerd();
        let version = self.env.ctr_ok(&["version"]);
        let server = version
            .lines()
            .skip_while(|l| !l.starts_with("Server"))
            .find(|l| l.trim_start().starts_with("Version"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        self.env.progress(format!(
            "cowsnap pid {:?}, containerd pid {:?} ({server})",
            self.env.cowsnap_pid(),
            self.env.containerd_pid()
        ));
        // containerd loaded the proxy plugin (docs/deploy.md's check).
        let plugins = self.env.ctr_ok(&["plugins", "ls"]);
        let row = plugins.lines().find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1") && f.get(1) == Some(&"cowsnap")
        });
        self.check(row.is_some_and(|r| r.trim_end().ends_with("ok")), || {
            format!("cowsnap in `ctr plugins ls`: {row:?}")
        });
        let row = row
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>();
        self.env
            .progress(format!("ctr plugins ls: {}", row.join(" ")));
        let empty = self.env.cowsnap_list().await;
        self.check(empty.is_empty(), || {
            format!("fresh cowsnap lists {empty:?}")
        });
        self.fig.data_used[0] = data_used(&self.env.mnt);
    }

    async fn import(&mut self) {
        let tar = self.image.tar.display().to_string();
        let out = self
            .env
            .ctr_ok(&["images", "import", "--snapshotter", "cowsnap", &tar]);
        self.env
            .progress(format!("ctr images import: {}", out.trim()));
        let images = self.env.ctr_ok(&["images", "ls", "-q"]);
        let name = self.image.name.clone();
        self.check(images.lines().any(|l| l == name), || {
            format!("image {name} not in `ctr images ls`: {images}")
        });

        // Through containerd: the chain of three committed layers.
        let ls = parse_ls(&self.env.snapshots_ok(&["ls"]));
        let mut want = BTreeMap::new();
        for (i, id) in self.image.chain_ids.iter().enumerate() {
            let parent = if i == 0 {
                String::new()
            } else {
                self.image.chain_ids[i - 1].clone()
            };
            want.insert(id.clone(), (parent, "Committed".to_owned()));
        }
        self.check_eq(ls, want, "`ctr snapshots ls` after import");

        // Directly: cowsnap has exactly those, with the same chain, as
        // read-only subvolumes in its committed area, and nothing else.
        let list = self.env.cowsnap_list().await;
        self.check_eq(list.len(), 3, "snapshots in cowsnap after import");
        let mut usage = Vec::new();
        for (i, chain) in self.image.chain_ids.clone().iter().enumerate() {
            let info = by_ctr_key(&list, chain);
            self.check_eq(info.kind, pb::Kind::Committed as i32, "layer kind");
            let want_parent = if i == 0 {
                String::new()
            } else {
                by_ctr_key(&list, &self.image.chain_ids[i - 1]).name.clone()
            };
            self.check_eq(info.parent.clone(), want_parent, "layer parent in cowsnap");
            let u = self.env.cowsnap_usage(&info.name).await;
            usage.push((u.size as u64, u.inodes as u64));
        }
        self.env
            .progress(format!("layer usage (bytes, inodes): {usage:?}"));
        // busybox alone is ~1.9 MB; layer 2 made > 3000 inodes.
        self.check(usage[0].0 > 1_900_000, || {
            format!("layer 1 usage {usage:?}")
        });
        let many = self.image.many_files_per_dir * (self.image.many_dirs_visible + 1);
        self.check(usage[1].1 >= many, || {
            format!("layer 2 inodes {usage:?}, want >= {many}")
        });
        self.fig.layer_usage = usage;
        let committed = self.env.area("committed");
        self.check_eq(committed.len(), 3, "subvolumes in <root>/committed");
        self.check(
            self.env.area("active").is_empty() && self.env.area("view").is_empty(),
            || "active/view areas not empty after import".into(),
        );
        self.check_eq(
            self.env.subvolumes().len(),
            3,
            "btrfs subvolume list after import",
        );
        for id in &committed {
            let p = self.env.root.join("committed").join(id);
            let ro = self.env.tool_ok(
                "btrfs",
                &["property", "get", &p.display().to_string(), "ro"],
            );
            self.check_eq(ro.trim(), "ro=true", "committed layer read-only flag");
        }
        // The xattr of layer 2 reached the filesystem (busybox in the
        // container cannot read xattrs, so check from the host).
        // Each layer is a btrfs snapshot of the one below.
        let chain = committed_chain(&self.env);
        self.check_eq(
            chain.len(),
            3,
            "committed subvolumes chained by parent uuid",
        );
        let file = self.env.mnt.join(&chain[2]).join("many/xattr.txt");
        let got = get_xattr(&file, &self.image.xattr.0);
        let want = Some(self.image.xattr.1.clone().into_bytes());
        self.check_eq(got, want, "xattr of /many/xattr.txt in the top layer");
    }

    async fn containers(&mut self) {
        // Every layer's files, none of the whited-out ones.
        let out = self.run_rm("e2e-layers", PROBE_SCRIPT, 0);
        let seen: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
        let dirs = self.image.many_dirs_visible;
        let files = dirs * self.image.many_files_per_dir + 3; // + hard, xattr.txt, owned.txt
        let want: BTreeMap<&str, String> = [
            ("busybox", "ok".into()),
            ("sh", "busybox".into()),
            ("passwd", "root:x:0:0:root:/root:/bin/sh".into()),
            ("keep", "v3".into()),
            ("doomed", "absent".into()),
            ("opq", "new.txt".into()),
            ("many_dirs", dirs.to_string()),
            ("many_files", files.to_string()),
            ("d19", "absent".into()),
            ("link", "d00/f000:d00/f000".into()),
            ("hard", "2:same".into()),
            ("owned", "1000:1000:640".into()),
            ("tmp", "1777".into()),
        ]
        .into_iter()
        .collect();
        for (k, v) in &want {
            let got = seen.get(k).copied();
            self.check_eq(got, Some(v.as_str()), &format!("container sees {k}"));
        }
        self.env
            .progress(format!("container saw {} facts as expected", want.len()));

        // Exit status goes through.
        self.run_rm("e2e-exit", "exit 7", 7);

        // A namespace's default snapshotter (docs/deploy.md): a client that
        // names none gets cowsnap.
        let ns = self.env.ns.clone();
        self.env.ctr_ok(&[
            "namespaces",
            "label",
            &ns,
            "containerd.io/defaults/snapshotter=cowsnap",
        ]);
        let name = self.image.name.clone();
        let out = self
            .env
            .ctr_run(&[&name, "e2e-default", "cat", "/etc/keep.txt"], true);
        self.check(out.code() == 0 && out.stdout == "v3\n", || {
            format!("container with the namespace's default snapshotter: {out:?}")
        });
        let list = self.env.cowsnap_list().await;
        let info = by_ctr_key(&list, "e2e-default");
        self.check_eq(
            info.kind,
            pb::Kind::Active as i32,
            "snapshot of a container that named no snapshotter",
        );
        self.env.ctr_ok(&["containers", "rm", "e2e-default"]);

        // A container that writes, exits, and stays (stopped) for the
        // restart stages: the first run writes /state, later runs print it
        // and exit 3.
        let out = self
            .env
            .ctr_run(&[&name, "e2e-writer", "sh", "-c", WRITER_SCRIPT], false);
        self.check(out.code() == 0 && out.stdout.trim() == "wrote", || {
            format!("writer's first run: {out:?}")
        });

        // A long-running container that writes and syncs 16 MiB.
        let out = self
            .env
            .ctr_run(&["-d", &name, "e2e-live", "sh", "-c", LIVE_SCRIPT], false);
        self.check(out.status.success(), || {
            format!("starting e2e-live: {out:?}")
        });
        let list = self.env.cowsnap_list().await;
        let live_key = by_ctr_key(&list, "e2e-live").name.clone();
        let mounts = self.env.cowsnap_mounts(&live_key).await;
        let source = PathBuf::from(&mounts[0].source);
        self.env.wait_until(
            "the live container to write",
            Duration::from_secs(60),
            |_| source.join("ready").exists(),
        );
        let u = self.env.cowsnap_usage(&live_key).await;
        let (size, inodes) = (u.size as u64, u.inodes as u64);
        self.env.progress(format!(
            "live container's snapshot: {size} bytes, {inodes} inodes"
        ));
        let mib = LIVE_WRITE_MIB << 20;
        self.check(size >= mib && size < mib + (1 << 20), || {
            format!("usage of the live container's snapshot {size}, want {mib} + < 1 MiB")
        });
        self.check(inodes >= 2, || {
            format!("inodes of the live snapshot {inodes}")
        });
        self.fig.live_usage = size;
        self.fig.live_inodes = inodes;
        let ctr_usage = parse_usage(&self.env.snapshots_ok(&["usage", "-b", "e2e-live"]));
        self.check_eq(
            ctr_usage.get("e2e-live").copied(),
            Some((size, inodes)),
            "ctr snapshots usage e2e-live",
        );

        // Two containers, one set of layers: both active snapshots are
        // children of the same committed snapshot, in cowsnap and on disk
        // (once containerd's GC has removed the --rm containers' ones).
        self.settle().await;
        let list = self.env.cowsnap_list().await;
        let top_name = by_ctr_key(&list, &self.top()).name.clone();
        let committed = list
            .iter()
            .filter(|i| i.kind == pb::Kind::Committed as i32)
            .count();
        self.check_eq(committed, 3, "committed snapshots with two containers");
        for c in ["e2e-writer", "e2e-live"] {
            let info = by_ctr_key(&list, c);
            self.check_eq(
                info.kind,
                pb::Kind::Active as i32,
                "container snapshot kind",
            );
            self.check_eq(
                info.parent.as_str(),
                top_name.as_str(),
                "container snapshot parent",
            );
        }
        let chain = committed_chain(&self.env);
        let subs = subvolume_uuids(&self.env);
        let top_uuid = subs[&chain[2]].1.clone();
        let children: Vec<&String> = subs
            .iter()
            .filter(|(p, (parent_uuid, _))| {
                p.starts_with("root/active/") && *parent_uuid == top_uuid
            })
            .map(|(p, _)| p)
            .collect();
        self.check_eq(
            children.len(),
            2,
            "active subvolumes snapshotted from the top layer's",
        );
        self.fig.max_snapshots = self.fig.max_snapshots.max(list.len());
    }

    async fn snapshot_commands(&mut self) {
        let top = self.top();
        // ls
        let ls = parse_ls(&self.env.snapshots_ok(&["ls"]));
        for c in ["e2e-writer", "e2e-live"] {
            self.check_eq(
                ls.get(c).cloned(),
                Some((top.clone(), "Active".into())),
                "ls row",
            );
        }
        self.check_eq(ls.len(), 5, "ls rows");
        // tree: the chain, then the containers under the top layer.
        let tree = self.env.snapshots_ok(&["tree"]);
        let depth = |key: &str| {
            tree.lines()
                .find(|l| l.trim_start().trim_start_matches("\\_ ") == key)
                .map(|l| l.len() - l.trim_start().len())
        };
        let depths: Vec<Option<usize>> = self
            .image
            .chain_ids
            .iter()
            .map(String::as_str)
            .chain(["e2e-live", "e2e-writer"])
            .map(depth)
            .collect();
        let ok = depths.iter().all(Option::is_some)
            && depths[0] < depths[1]
            && depths[1] < depths[2]
            && depths[2] < depths[3]
            && depths[3] == depths[4];
        self.check(ok, || format!("tree shape {depths:?}:\n{tree}"));
        // info
        let info: Value = serde_json::from_str(&self.env.snapshots_ok(&["info", "e2e-live"]))
            .expect("info is JSON");
        self.check_eq(info["Kind"].as_str(), Some("Active"), "info Kind");
        self.check_eq(info["Parent"].as_str(), Some(top.as_str()), "info Parent");
        // mounts: the bind mount of the container's subvolume.
        let list = self.env.cowsnap_list().await;
        let live_key = by_ctr_key(&list, "e2e-live").name.clone();
        let direct = self.env.cowsnap_mounts(&live_key).await;
        let m = self
            .env
            .snapshots_ok(&["mounts", "/e2e-target", "e2e-live"]);
        let want = format!("mount -t bind {} /e2e-target -o rbind,rw", direct[0].source);
        self.check_eq(m.trim(), want.as_str(), "ctr snapshots mounts");
        let src = Path::new(&direct[0].source);
        self.check(src.starts_with(self.env.root.join("active")), || {
            format!("active snapshot mounted from {}", src.display())
        });
        // label: containerd passes only containerd.io/snapshot/ labels on.
        self.env.snapshots_ok(&[
            "label",
            "e2e-live",
            "containerd.io/snapshot/e2e=labelled",
            "e2e.local=containerd-only",
        ]);
        let info: Value = serde_json::from_str(&self.env.snapshots_ok(&["info", "e2e-live"]))
            .expect("info is JSON");
        self.check_eq(
            info["Labels"]["containerd.io/snapshot/e2e"].as_str(),
            Some("labelled"),
            "label via ctr",
        );
        self.check_eq(
            info["Labels"]["e2e.local"].as_str(),
            Some("containerd-only"),
            "local label via ctr",
        );
        let st = self.env.cowsnap_stat(&live_key).await;
        self.check_eq(
            st.labels
                .get("containerd.io/snapshot/e2e")
                .map(String::as_str),
            Some("labelled"),
            "label in cowsnap",
        );
        self.check_eq(
            st.labels.get("e2e.local"),
            None,
            "containerd-local label in cowsnap",
        );
        // usage of all: containerd passes cowsnap's figures through.
        let usage = parse_usage(&self.env.snapshots_ok(&["usage", "-b"]));
        self.check_eq(usage.len(), 5, "usage rows");
        for (i, id) in self.image.chain_ids.clone().iter().enumerate() {
            self.check_eq(
                usage.get(id).copied(),
                Some(self.fig.layer_usage[i]),
                "ctr usage of a layer",
            );
        }
        // prepare, view, rm. ctr labels what it prepares as a GC root, but
        // not its views: containerd's GC would remove the view at its next
        // pass after any deletion. So no deletion may be pending (settle)
        // until the view is labelled.
        self.settle().await;
        self.env.snapshots_ok(&["prepare", "e2e-extra", &top]);
        // ctr creates the view under a lease it deletes on exit, and the
        // lease's deletion schedules a GC pass that may remove the view
        // before it is labelled: then create and label it again.
        let mut labelled = false;
        for _ in 0..5 {
            let view = self.env.ctr(&[
                "snapshots",
                "--snapshotter",
                "cowsnap",
                "view",
                "e2e-view",
                &top,
            ]);
            if !view.status.success() && !view.stderr.contains("already exists") {
                panic!("ctr snapshots view e2e-view failed: {}", view.stderr.trim());
            }
            let label = self.env.ctr(&[
                "snapshots",
                "--snapshotter",
                "cowsnap",
                "label",
                "e2e-view",
                "containerd.io/gc.root=e2e",
            ]);
            if label.status.success() {
                labelled = true;
                break;
            }
            assert!(
                label.stderr.contains("not found"),
                "label e2e-view: {}",
                label.stderr.trim()
            );
            eprintln!("e2e: containerd's GC removed the unlabelled view first; creating it again");
            self.settle().await;
        }
        assert!(
            labelled,
            "the view could not be labelled before containerd's GC removed it"
        );
        let list = self.env.cowsnap_list().await;
        self.fig.max_snapshots = self.fig.max_snapshots.max(list.len());
        self.check_eq(
            by_ctr_key(&list, "e2e-extra").kind,
            pb::Kind::Active as i32,
            "prepared kind",
        );
        let view = by_ctr_key(&list, "e2e-view").clone();
        self.check_eq(view.kind, pb::Kind::View as i32, "view kind");
        self.check_eq(self.env.area("view").len(), 1, "subvolumes in <root>/view");
        self.check_eq(
            self.env.area("active").len(),
            3,
            "subvolumes in <root>/active",
        );
        self.check_eq(
            self.env.subvolumes().len(),
            7,
            "btrfs subvolume list with 7 snapshots",
        );
        // A layer with children cannot go.
        let out = self
            .env
            .ctr(&["snapshots", "--snapshotter", "cowsnap", "rm", &top]);
        self.check(!out.status.success(), || {
            format!("removing the top layer under containers: {out:?}")
        });
        self.env.snapshots_ok(&["rm", "e2e-extra", "e2e-view"]);
        let ls = parse_ls(&self.env.snapshots_ok(&["ls"]));
        self.check_eq(ls.len(), 5, "ls rows after rm");
        // containerd's GC makes cowsnap drop them too.
        self.settle().await;
        self.check(self.env.area("view").is_empty(), || {
            "view area not empty after rm".into()
        });
        self.check_eq(
            self.env.area("active").len(),
            2,
            "subvolumes in <root>/active after rm",
        );
    }

    async fn restart_cowsnap(&mut self) {
        let before = self.state().await;
        let live_pid = self.task_pid("e2e-live");
        let status = self.env.stop_cowsnap();
        self.check(status.success(), || {
            format!("cowsnap exit status on SIGTERM: {status}")
        });
        let out = self
            .env
            .ctr(&["snapshots", "--snapshotter", "cowsnap", "ls"]);
        self.check(!out.status.success(), || {
            "ctr snapshots ls answered while cowsnap was down".into()
        });
        let t0 = Instant::now();
        self.env.start_cowsnap();
        // containerd redials with backoff (at most a few seconds).
        self.env.wait_until(
            "containerd to reach cowsnap again",
            Duration::from_secs(30),
            |env| {
                env.ctr(&["snapshots", "--snapshotter", "cowsnap", "ls"])
                    .status
                    .success()
            },
        );
        self.fig.cowsnap_reconnect = t0.elapsed().as_secs_f64();
        self.env.progress(format!(
            "containerd reached the new cowsnap after {:.1}s",
            self.fig.cowsnap_reconnect
        ));
        let after = self.state().await;
        self.check_eq(after, before, "state across a cowsnap restart");
        self.check_eq(
            self.task_pid("e2e-live"),
            live_pid,
            "live container across a cowsnap restart",
        );
        self.use_existing("after-cowsnap-restart").await;
    }

    async fn restart_containerd(&mut self) {
        let before = self.state().await;
        let live_pid = self.task_pid("e2e-live");
        let cowsnap_pid = self.env.cowsnap_pid();
        let status = self.env.stop_containerd();
        self.check(status.success(), || {
            format!("containerd exit status on SIGTERM: {status}")
        });
        self.env.start_containerd();
        let after = self.state().await;
        self.check_eq(after, before, "state across a containerd restart");
        self.check_eq(self.env.cowsnap_pid(), cowsnap_pid, "cowsnap kept running");
        self.check_eq(
            self.task_pid("e2e-live"),
            live_pid,
            "live container across a containerd restart",
        );
        self.use_existing("after-containerd-restart").await;
    }

    /// The stopped container runs again on its old snapshot (its data is
    /// there), a new container starts from the image, and containerd and
    /// cowsnap agree afterwards.
    async fn use_existing(&mut self, tag: &str) {
        let mut args = vec![
            "task".to_owned(),
            "start".to_owned(),
            "--fifo-dir".to_owned(),
        ];
        args.push(self.env.dir.join("fifo").display().to_string());
        args.push("e2e-writer".into());
        let out = self
            .env
            .ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
        self.check(out.code() == 3 && out.stdout.trim() == "first-run", || {
            format!("stopped container restarted {tag}: {out:?}")
        });
        let out = self.run_rm(&format!("e2e-{tag}"), "cat /etc/keep.txt /many/d00/f001", 0);
        self.check_eq(
            out.as_str(),
            "v3\nd00/f001\n",
            "new container from the image",
        );
        self.settle().await;
    }

    /// User-namespaced containers on the image's layers, without copying
    /// them: two mappings and no mapping side by side. Inside, the image's
    /// files and new ones belong to root; from the host (through the
    /// container's root) they belong to the mapped ids; the committed
    /// layers keep their owners and are shared (no new committed
    /// snapshot, each container's snapshot holds only what it wrote).
    async fn user_namespaces(&mut self) {
        let name = self.image.name.clone();
        let committed_before = self.env.area("committed");
        let layers_before: Vec<String> = self
            .env
            .cowsnap_list()
            .await
            .into_iter()
            .filter(|i| i.kind == pb::Kind::Committed as i32)
            .map(|i| i.name)
            .collect();
        self.mapping_labels_directly(&layers_before).await;
        // (container, mapping, host id of the container's root)
        let runs: [(&str, Option<&str>, u32); 3] = [
            ("e2e-userns-a", Some("0:100000:65536"), 100_000),
            ("e2e-userns-b", Some("0:200000:65536"), 200_000),
            ("e2e-userns-none", None, 0),
        ];
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for (id, map, _) in runs {
            let t = Instant::now();
            let mut args = vec!["-d"];
            if let Some(m) = map {
                args.extend(["--uidmap", m, "--gidmap", m, "--remap-labels"]);
            }
            args.extend([name.as_str(), id, "sh", "-c", USERNS_SCRIPT]);
            let out = self.env.ctr_run(&args, false);
            self.check(out.status.success(), || {
                format!("starting {id} (mapping {map:?}): {out:?}")
            });
            starts.push(format!("{id} {:.2}s", t.elapsed().as_secs_f64()));
        }
        self.env
            .progress(format!("`ctr run -d` took: {}", starts.join(", ")));
        let mut facts = BTreeMap::new();
        for (id, map, host) in runs {
            let pid = self
                .task_pid(id)
                .unwrap_or_else(|| panic!("no task {id} in `ctr tasks ls`"));
            let root = PathBuf::from(format!("/proc/{pid}/root"));
            self.env.wait_until(
                &format!("{id} to report ready"),
                Duration::from_secs(60),
                |_| root.join("ready").exists(),
            );
            let text = std::fs::read_to_string(root.join("facts")).expect("the container's /facts");
            let seen: BTreeMap<String, String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            // Inside: root's files are root's, whatever the mapping.
            let want: BTreeMap<String, String> = [
                ("id", "0:0"),
                ("busybox", "0:0"),
                ("file", "0:0"),
                ("owned", "1000:1000:640"),
                ("written", "0:0"),
                ("hard", "2:same"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            self.check_eq(&seen, &want, &format!("{id} (mapping {map:?}) sees"));
            // From the host, through the container's root: the mapped ids.
            for (path, uid) in [
                ("bin/busybox", host),
                ("many/d00/f000", host),
                ("many/hard", host),
                ("many/owned.txt", host + 1000),
                ("written", host),
            ] {
                let md = std::fs::metadata(root.join(path))
                    .unwrap_or_else(|e| panic!("stat {}/{path}: {e}", root.display()));
                self.check_eq(
                    (md.uid(), md.gid()),
                    (uid, uid),
                    &format!("{id}: owner of /{path} seen from the host"),
                );
            }
            // The hard link is still one inode with two names.
            let (a, b) = (root.join("many/hard"), root.join("many/d00/f000"));
            let (a, b) = (
                std::fs::metadata(&a).expect("stat /many/hard"),
                std::fs::metadata(&b).expect("stat /many/d00/f000"),
            );
            self.check(a.ino() == b.ino() && a.nlink() == 2, || {
                format!(
                    "{id}: hard link seen from the host: inodes {} {}, {} links",
                    a.ino(),
                    b.ino(),
                    a.nlink()
                )
            });
            // cowsnap's mounts carry the mapping (containerd mounts them
            // idmapped); none without one.
            let list = self.env.cowsnap_list().await;
            let key = by_ctr_key(&list, id).name.clone();
            let mounts = self.env.cowsnap_mounts(&key).await;
            let has_map = mounts
                .iter()
                .flat_map(|m| m.options.iter())
                .any(|o| o.starts_with("uidmap="));
            self.check_eq(has_map, map.is_some(), &format!("{id}: uidmap= in mounts"));
            // On disk, in the container's own snapshot, what it wrote
            // belongs to 0: the mapping lives in the mount, not the files.
            let written = Path::new(&mounts[0].source).join("written");
            let md = std::fs::metadata(&written)
                .unwrap_or_else(|e| panic!("stat {}: {e}", written.display()));
            self.check_eq(
                (md.uid(), md.gid()),
                (0, 0),
                &format!("{id}: owner of /written in its snapshot on disk"),
            );
            // Only what the container wrote is its own.
            let u = self.env.cowsnap_usage(&key).await;
            self.check(u.size < 1 << 20, || {
                format!(
                    "{id}: snapshot usage {} bytes, want < 1 MiB (no copy)",
                    u.size
                )
            });
            facts.insert(id, (u.size, u.inodes));
        }
        self.env.progress(format!(
            "3 containers (2 mappings, 1 none) ready in {:.1}s; snapshot usage (bytes, inodes): {facts:?}",
            t0.elapsed().as_secs_f64()
        ));
        // The layers are shared and untouched: same committed snapshots,
        // original owners on disk.
        let layers_after: Vec<String> = self
            .env
            .cowsnap_list()
            .await
            .into_iter()
            .filter(|i| i.kind == pb::Kind::Committed as i32)
            .map(|i| i.name)
            .collect();
        self.check_eq(
            &layers_after,
            &layers_before,
            "committed snapshots with user namespaces",
        );
        self.check_eq(
            self.env.area("committed"),
            committed_before,
            "<root>/committed with user namespaces",
        );
        let chain = committed_chain(&self.env);
        let top = self.env.mnt.join(&chain[2]);
        for (path, uid) in [
            ("bin/busybox", 0),
            ("many/d00/f000", 0),
            ("many/owned.txt", 1000),
        ] {
            let md = std::fs::metadata(top.join(path))
                .unwrap_or_else(|e| panic!("stat {}/{path}: {e}", top.display()));
            self.check_eq(
                (md.uid(), md.gid()),
                (uid, uid),
                &format!("owner of /{path} in the committed top layer"),
            );
        }
        // For comparison only (not checked): ctr's own remapping without
        // the labels, which copies and chowns the image into a new
        // committed snapshot before the container starts.
        let t = Instant::now();
        let m = "0:300000:65536";
        let out = self.env.ctr_run(
            &[
                "--rm",
                "--uidmap",
                m,
                "--gidmap",
                m,
                &name,
                "e2e-userns-copy",
                "true",
            ],
            false,
        );
        let copy_secs = t.elapsed().as_secs_f64();
        let committed_now = self.env.area("committed").len();
        self.env.progress(format!(
            "for comparison, ctr's chowned copy (no --remap-labels): exit {} in {copy_secs:.2}s, \
             committed subvolumes {} -> {committed_now}{}",
            out.code(),
            layers_before.len(),
            if out.code() == 0 {
                String::new()
            } else {
                format!(" ({})", out.stderr.trim())
            }
        ));
        for (id, _, _) in runs {
            self.env
                .ctr_ok(&["tasks", "kill", "--signal", "SIGKILL", id]);
        }
        self.env.wait_until(
            "the user-namespace tasks to stop",
            Duration::from_secs(30),
            |env| {
                env.ctr_ok(&["tasks", "ls"])
                    .lines()
                    .all(|l| !l.contains("e2e-userns") || !l.contains("RUNNING"))
            },
        );
        for (id, _, _) in runs {
            self.env.ctr_ok(&["tasks", "rm", id]);
            self.env.ctr_ok(&["containers", "rm", id]);
        }
        // A garbage collection now, synchronously (deleting a lease with
        // --sync runs one): once, the last container's snapshot outlived
        // the scheduled collections (GC pass already running when it was
        // released?), and nothing else would trigger another here.
        let lease = self.env.ctr_ok(&["leases", "create"]);
        let lease = lease.trim().to_owned();
        self.env.ctr_ok(&["leases", "delete", "--sync", &lease]);
        self.settle().await;
    }

    /// The mapping labels on Prepare and View, asked directly: malformed
    /// ones are refused with InvalidArgument and create nothing; a mapped
    /// view's mounts carry the mapping and no `ro` (containerd does not
    /// idmap a read-only bind mount; the subvolume itself is read-only).
    async fn mapping_labels_directly(&mut self, layers: &[String]) {
        let top = layers.last().expect("committed layers").clone();
        let labels = |uid: &str, gid: &str| {
            [
                ("containerd.io/snapshot/uidmapping", uid),
                ("containerd.io/snapshot/gidmapping", gid),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<std::collections::HashMap<_, _>>()
        };
        let before = self.env.cowsnap_list().await.len();
        let mut c = self.env.client().await;
        for (uid, gid) in [("0:100000", "0:100000:65536"), ("0:100000:65536", "x:1:2")] {
            let err = c
                .prepare(pb::PrepareSnapshotRequest {
                    snapshotter: harness::SNAPSHOTTER.into(),
                    key: "e2e-bad-mapping".into(),
                    parent: top.clone(),
                    labels: labels(uid, gid),
                })
                .await
                .expect_err("Prepare with a malformed mapping");
            self.check_eq(
                err.code(),
                tonic::Code::InvalidArgument,
                "Prepare, bad mapping",
            );
            let err = c
                .view(pb::ViewSnapshotRequest {
                    snapshotter: harness::SNAPSHOTTER.into(),
                    key: "e2e-bad-mapping".into(),
                    parent: top.clone(),
                    labels: labels(uid, gid),
                })
                .await
                .expect_err("View with a malformed mapping");
            self.check_eq(
                err.code(),
                tonic::Code::InvalidArgument,
                "View, bad mapping",
            );
        }
        let after = self.env.cowsnap_list().await.len();
        self.check_eq(after, before, "snapshots after refused mappings");
        let m = "0:100000:65536";
        let mounts = c
            .view(pb::ViewSnapshotRequest {
                snapshotter: harness::SNAPSHOTTER.into(),
                key: "e2e-mapped-view".into(),
                parent: top,
                labels: labels(m, m),
            })
            .await
            .unwrap_or_else(|e| panic!("View with a mapping: {e}"))
            .into_inner()
            .mounts;
        let opts: Vec<&str> = mounts
            .iter()
            .flat_map(|m| m.options.iter().map(String::as_str))
            .collect();
        self.check(
            opts.contains(&"uidmap=0:100000:65536")
                && opts.contains(&"gidmap=0:100000:65536")
                && !opts.contains(&"ro"),
            || format!("mapped view's mount options {opts:?}"),
        );
        let ro = self
            .env
            .tool_ok("btrfs", &["property", "get", &mounts[0].source, "ro"]);
        self.check_eq(
            ro.trim(),
            "ro=true",
            "mapped view's subvolume read-only flag",
        );
        c.remove(pb::RemoveSnapshotRequest {
            snapshotter: harness::SNAPSHOTTER.into(),
            key: "e2e-mapped-view".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("Remove the mapped view: {e}"));
    }

    async fn garbage_collection(&mut self) {
        self.fig.data_used[1] = data_used(&self.env.mnt);
        let t0 = Instant::now();
        self.env
            .ctr_ok(&["tasks", "kill", "--signal", "SIGKILL", "e2e-live"]);
        self.env
            .wait_until("the live task to stop", Duration::from_secs(30), |env| {
                env.ctr_ok(&["tasks", "ls"])
                    .lines()
                    .all(|l| !l.contains("RUNNING"))
            });
        self.env.ctr_ok(&["tasks", "rm", "e2e-live"]);
        self.env
            .ctr_ok(&["containers", "rm", "e2e-live", "e2e-writer"]);
        let name = self.image.name.clone();
        self.env.ctr_ok(&["images", "rm", "--sync", &name]);
        // containerd's GC removes every snapshot from cowsnap by itself.
        let mut remaining = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = self.env.cowsnap_list().await;
            if list.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                remaining = list.len();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.check_eq(
            remaining,
            0,
            "snapshots left in cowsnap 60 s after removing everything",
        );
        self.fig.gc_seconds = t0.elapsed().as_secs_f64();
        self.env.progress(format!(
            "containers and image removed, cowsnap empty after {:.1}s",
            self.fig.gc_seconds
        ));
        let ls = self.env.snapshots_ok(&["ls"]);
        self.check_eq(
            ls.lines().count(),
            1,
            "ctr snapshots ls lines (header only)",
        );
        // containerd calls Cleanup after its GC pass removed snapshots.
        let log = self.env.cowsnap_log.clone();
        let cleaned = |_: &mut Env| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let last = |op: &str| {
                lines
                    .iter()
                    .rposition(|l| l.contains(&format!("op=\"{op}\"")))
            };
            matches!((last("remove"), last("cleanup")), (Some(r), Some(c)) if c > r)
        };
        self.env.wait_until(
            "containerd to call Cleanup after its last Remove",
            Duration::from_secs(30),
            cleaned,
        );
        self.fig.checks += 1;

        // Directly: wait until btrfs has dropped the deleted subvolumes'
        // trees, let cowsnap's Cleanup remove what accounting is left, and
        // compare with the empty filesystem.
        let mnt = self.env.mnt.display().to_string();
        self.env.progress(
            "containerd called Cleanup; waiting for btrfs to drop the deleted subvolumes",
        );
        // Deleted subvolumes are cleaned in the background after a
        // transaction commit: commit now rather than in up to 30 s.
        self.env.tool_ok("btrfs", &["filesystem", "sync", &mnt]);
        self.env.tool_ok("btrfs", &["subvolume", "sync", &mnt]);
        self.env.cowsnap_cleanup().await;
        for area in ["active", "view", "committed"] {
            let left = self.env.area(area);
            self.check(left.is_empty(), || {
                format!("<root>/{area} still holds {left:?}")
            });
        }
        let subs = self.env.subvolumes();
        self.check(subs.is_empty(), || format!("subvolumes left: {subs:?}"));
        let deleted = self
            .env
            .tool_ok("btrfs", &["subvolume", "list", "-d", &mnt]);
        self.check(deleted.trim().is_empty(), || {
            format!("deleted subvolumes not cleaned: {deleted}")
        });
        let qgroups = self
            .env
            .tool_ok("btrfs", &["qgroup", "show", "--raw", &mnt]);
        let groups: Vec<&str> = qgroups
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|g| g.starts_with("0/"))
            .collect();
        self.check_eq(groups, vec!["0/5"], "quota groups left");
        self.fig.data_used[2] = data_used(&self.env.mnt);
        let [base, peak, after] = self.fig.data_used;
        self.env.progress(format!(
            "btrfs data used: empty {base}, with image and containers {peak}, after GC {after}"
        ));
        self.check(after <= base + (1 << 20), || {
            format!("space not reclaimed: {after} bytes used, {base} when empty")
        });
    }

    async fn shutdown(&mut self) {
        let status = self.env.stop_containerd();
        self.check(status.success(), || {
            format!("containerd exit status: {status}")
        });
        let status = self.env.stop_cowsnap();
        self.check(status.success(), || {
            format!("cowsnap exit status: {status}")
        });
        let dir = self.env.dir.clone();
        let problems = self.env.teardown();
        self.check(problems.is_empty(), || format!("teardown: {problems:?}"));
        let left = cleanup::leftovers(&dir, &self.env.ns);
        self.check(left.is_empty(), || format!("left behind: {left:?}"));
    }

    fn report(&self) {
        let f = &self.fig;
        let stages: Vec<String> = f
            .stages
            .iter()
            .map(|(n, s)| format!("{n} {s:.1}s"))
            .collect();
        self.env.progress(format!("stages: {}", stages.join(", ")));
        self.env.progress(format!(
            "figures: up to {} snapshots; layer usage {:?}; live container {} bytes / {} inodes; \
             cowsnap restart seen by containerd after {:.1}s; GC emptied cowsnap in {:.1}s; \
             btrfs data used {:?}",
            f.max_snapshots,
            f.layer_usage,
            f.live_usage,
            f.live_inodes,
            f.cowsnap_reconnect,
            f.gc_seconds,
            f.data_used
        ));
        self.env.progress(format!(
            "e2e: all {} checks passed in {:.1}s",
            f.checks,
            self.env.elapsed().as_secs_f64()
        ));
    }

    /// `ctr run --rm` with `script`; checks the exit code and returns stdout.
    fn run_rm(&mut self, id: &str, script: &str, want_code: i32) -> String {
        let name = self.image.name.clone();
        let out = self
            .env
            .ctr_run(&["--rm", &name, id, "sh", "-c", script], false);
        let code = out.code();
        self.check(code == want_code, || {
            format!("container {id} exited {code}, want {want_code}: {out:?}")
        });
        out.stdout
    }

    /// The pid of a task per `ctr tasks ls`.
    fn task_pid(&self, id: &str) -> Option<String> {
        self.env
            .ctr_ok(&["tasks", "ls"])
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_owned)
    }

    /// Waits until cowsnap holds exactly the snapshots containerd knows
    /// (containerd's GC removes the rest).
    async fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let known: BTreeSet<String> = parse_ls(&self.env.snapshots_ok(&["ls"]))
                .into_keys()
                .collect();
            let list = self.env.cowsnap_list().await;
            let have: BTreeSet<String> = list.iter().map(|i| ctr_key(&i.name)).collect();
            if have == known {
                return;
            }
            if Instant::now() > deadline {
                self.check_eq(have, known, "cowsnap's snapshots vs containerd's after GC");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Everything that must survive a restart: cowsnap's records (all
    /// fields, timestamps included), its areas, btrfs's subvolumes,
    /// containerd's snapshots, images and containers.
    async fn state(&mut self) -> State {
        self.settle().await;
        let records = self
            .env
            .cowsnap_list()
            .await
            .into_iter()
            .map(|i| format!("{i:?}"))
            .collect();
        State {
            records,
            areas: ["active", "view", "committed"].map(|a| self.env.area(a)),
            subvolumes: self.env.subvolumes(),
            ctr_snapshots: self.env.snapshots_ok(&["ls"]),
            images: self.env.ctr_ok(&["images", "ls", "-q"]),
            containers: self.env.ctr_ok(&["containers", "ls", "-q"]),
        }
    }
}

/// What must not change across restarts.
#[derive(Debug, PartialEq)]
struct State {
    records: Vec<String>,
    areas: [BTreeSet<String>; 3],
    subvolumes: BTreeSet<String>,
    ctr_snapshots: String,
    images: String,
    containers: String,
}

/// Prints facts about the image as `key=value` lines (see `containers`).
const PROBE_SCRIPT: &str = r#"
yn() { if "$@"; then echo present; else echo absent; fi; }
echo busybox=$(test -x /bin/busybox && echo ok)
echo sh=$(readlink /bin/sh)
echo passwd=$(head -n 1 /etc/passwd)
echo keep=$(cat /etc/keep.txt)
echo doomed=$(yn test -e /etc/doomed.txt)
echo opq=$(ls -A /data/opq | tr '\n' ' ' | sed 's/ $//')
echo many_dirs=$(ls -d /many/d* | wc -l)
echo many_files=$(find /many -type f | wc -l)
echo d19=$(yn test -e /many/d19)
echo link=$(readlink /many/link):$(cat /many/link)
same=different; [ "$(stat -c %i /many/hard)" = "$(stat -c %i /many/d00/f000)" ] && same=same
echo hard=$(stat -c %h /many/hard):$same
echo owned=$(stat -c %u:%g:%a /many/owned.txt)
echo tmp=$(stat -c %a /tmp)
"#;

/// Writes /written, then the owners it sees as `key=value` lines to
/// /facts, says so with /ready, then idles (see `user_namespaces`).
const USERNS_SCRIPT: &str = r#"
echo hi > /written
{
echo id=$(id -u):$(id -g)
echo busybox=$(stat -c %u:%g /bin/busybox)
echo file=$(stat -c %u:%g /many/d00/f000)
echo owned=$(stat -c %u:%g:%a /many/owned.txt)
echo written=$(stat -c %u:%g /written)
same=different; [ "$(stat -c %i /many/hard)" = "$(stat -c %i /many/d00/f000)" ] && same=same
echo hard=$(stat -c %h /many/hard):$same
} > /facts
sync
touch /ready
exec sleep 3600
"#;

/// First run: writes /state and 4 MiB, syncs, prints "wrote". Later runs
/// print /state and exit 3.
const WRITER_SCRIPT: &str = "if [ -e /state ]; then cat /state; exit 3; fi; \
    echo first-run > /state && dd if=/dev/urandom of=/blob bs=1M count=4 2>/dev/null && sync && echo wrote";

/// Writes 16 MiB, syncs (so that btrfs accounts it now rather than at the
/// next transaction commit), says so with /ready, then idles.
const LIVE_SCRIPT: &str = "dd if=/dev/urandom of=/live.bin bs=1M count=16 2>/dev/null && sync && touch /ready && exec sleep 3600";
