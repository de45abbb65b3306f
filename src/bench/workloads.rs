//! The workloads, each driving a [`Target`] through the snapshots API only,
//! so the same code measures cowsnap's socket and containerd's (with any
//! snapshotter behind it).
//!
//! Every workload creates its snapshots under a key prefix of its own run
//! and removes them when done. Files are written through the mounts the
//! snapshotter returned, as containerd's unpacker and a container would.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Barrier;

use super::mount::mount_all;
use super::powercut::{LayerId, materialize};
use super::record::{Better, Emitter, Samples};
use super::target::{Conn, Target};

/// Size of every small file the workloads write: one 4 KiB block, so it is
/// stored as a data extent (not inline in the metadata) and the bytes
/// written are the bytes allocated.
pub const FILE_SIZE: usize = 4096;
/// Files per directory when filling a snapshot.
const FILES_PER_DIR: usize = 1000;
/// The label every listed snapshot gets (containerd passes only labels
/// with the `containerd.io/snapshot/` prefix on to a snapshotter).
const GROUP_LABEL: &str = "containerd.io/snapshot/cowsnap-bench.group";

/// How much work each workload does.
#[derive(Clone, Debug)]
pub struct Scale {
    /// Prepare + Commit + Remove cycles.
    pub cycles: usize,
    /// Layers of the chain.
    pub chain: usize,
    /// File counts at which Usage is measured (cumulative, ascending).
    pub usage_files: Vec<usize>,
    /// Usage calls at each file count: (up to this many files, calls).
    pub usage_calls: Vec<(usize, usize)>,
    /// Snapshots the List workload creates.
    pub list_snapshots: usize,
    /// Calls of each List variant.
    pub list_calls: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Mixed iterations per client (7 calls each).
    pub client_iterations: usize,
    /// Views of the chain's top (each created, mounted, checked, removed).
    pub views: usize,
    /// The commits workload's small layer, and how many are committed.
    pub commit_small: (LayerShape, usize),
    /// Its large layer, and how many.
    pub commit_large: (LayerShape, usize),
    /// Clients committing at the same moment, the layer each commits, and
    /// how many rounds of that.
    pub commit_clients: (usize, LayerShape, usize),
    /// Pause after each Remove of the commits workload, so that deferred
    /// deletions (containerd's garbage collector) land before the next
    /// Commit rather than in it.
    pub commit_pause: Duration,
    /// Pause after each workload, for deferred work (containerd's garbage
    /// collector, btrfs's cleaner) to settle.
    pub settle: Duration,
}

impl Scale {
    /// The figures of the issue: 200 cycles, 128 layers, Usage at 1, 10 000
    /// and 100 000 files, List over 1000, 8 clients.
    pub fn full() -> Scale {
        Scale {
            cycles: 200,
            chain: 128,
            usage_files: vec![1, 10_000, 100_000],
            usage_calls: vec![(1, 50), (10_000, 10), (usize::MAX, 5)],
            list_snapshots: 1000,
            list_calls: 20,
            clients: 8,
            client_iterations: 40,
            views: 10,
            commit_small: (LayerShape::Uniform(10), 30),
            commit_large: (
                LayerShape::Mixed {
                    files: 2000,
                    big_mib: 64,
                },
                10,
            ),
            commit_clients: (
                8,
                LayerShape::Mixed {
                    files: 200,
                    big_mib: 0,
                },
                5,
            ),
            commit_pause: Duration::from_millis(200),
            settle: Duration::from_secs(2),
        }
    }

    /// Tiny counts: every code path once, in seconds (CI's smoke run).
    pub fn smoke() -> Scale {
        Scale {
            cycles: 5,
            chain: 4,
            usage_files: vec![1, 200],
            usage_calls: vec![(usize::MAX, 2)],
            list_snapshots: 20,
            list_calls: 2,
            clients: 8,
            client_iterations: 2,
            views: 1,
            commit_small: (LayerShape::Uniform(10), 2),
            commit_large: (
                LayerShape::Mixed {
                    files: 50,
                    big_mib: 1,
                },
                1,
            ),
            commit_clients: (
                8,
                LayerShape::Mixed {
                    files: 10,
                    big_mib: 0,
                },
                1,
            ),
            commit_pause: Duration::ZERO,
            settle: Duration::ZERO,
        }
    }

    fn usage_calls_at(&self, files: usize) -> usize {
        self.usage_calls
            .iter()
            .find(|(up_to, _)| files <= *up_to)
            .map_or(1, |(_, calls)| *calls)
    }
}

/// The content of one layer of the commits workload.
#[derive(Clone, Copy, Debug)]
pub enum LayerShape {
    /// This many files of [`FILE_SIZE`] bytes.
    Uniform(usize),
    /// The power-cut workload's layer ([`materialize`]): `files` files of
    /// mixed sizes (~13 KiB on average) with directories and links, plus
    /// one file of `big_mib` MiB (none when 0).
    Mixed {
        /// Small and medium files.
        files: u32,
        /// Size of the one large file, MiB.
        big_mib: u32,
    },
}

impl LayerShape {
    /// Writes the layer under `root`; `writer` varies the content of
    /// layers written at the same time. Returns the bytes written.
    fn write(self, root: &Path, writer: u32) -> Result<u64, String> {
        match self {
            LayerShape::Uniform(files) => {
                fill(root, 0, files)?;
                Ok((files * FILE_SIZE) as u64)
            }
            LayerShape::Mixed { files, big_mib } => {
                let id = LayerId {
                    run: 0,
                    writer,
                    layer: 0,
                    files,
                    large: u32::from(big_mib > 0),
                    large_mib: big_mib,
                };
                materialize(root, &id)
            }
        }
    }
}

/// The workloads `run` knows.
pub const WORKLOADS: &[&str] = &["cycles", "chain", "usage", "list", "concurrent", "commits"];

/// One benchmark run against one target.
pub struct Bench {
    target: Target,
    scale: Scale,
    /// Mount points go here.
    work_dir: PathBuf,
    /// A path on the snapshots' filesystem, synced after each workload.
    settle_path: Option<PathBuf>,
    /// The filesystem's `/sys/fs/btrfs/<uuid>`: transaction commits are
    /// counted per workload.
    btrfs_sysfs: Option<PathBuf>,
    /// Prefix of every key of this run.
    run: String,
    out: Emitter,
}

impl Bench {
    /// A run measuring `target`, reported as `label`.
    pub fn new(
        target: Target,
        label: &str,
        scale: Scale,
        work_dir: PathBuf,
        settle_path: Option<PathBuf>,
    ) -> Bench {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Bench {
            target,
            scale,
            work_dir,
            settle_path,
            btrfs_sysfs: None,
            run: format!("bench-{}-{nanos}", std::process::id()),
            out: Emitter::new(label),
        }
    }

    /// Counts the btrfs transaction commits of each workload, from
    /// `<dir>/commit_stats` (`dir` = `/sys/fs/btrfs/<uuid>`).
    pub fn count_btrfs_commits(mut self, dir: Option<PathBuf>) -> Bench {
        self.btrfs_sysfs = dir;
        self
    }

    /// The records emitted so far.
    pub fn emitter(&self) -> &Emitter {
        &self.out
    }

    /// Runs one workload by name.
    pub async fn workload(&mut self, name: &str) -> Result<(), String> {
        let started = Instant::now();
        eprintln!("bench: {name} on {} ...", self.target.snapshotter);
        let commits_before = match &self.btrfs_sysfs {
            Some(dir) => Some(commit_stats(dir)?),
            None => None,
        };
        match name {
            "cycles" => self.cycles().await,
            "chain" => self.chain().await,
            "usage" => self.usage().await,
            "list" => self.list().await,
            "concurrent" => self.concurrent().await,
            "commits" => self.commits().await,
            other => Err(format!(
                "unknown workload {other:?} (known: {})",
                WORKLOADS.join(", ")
            )),
        }
        .map_err(|e| format!("workload {name}: {e}"))?;
        if let (Some(dir), Some((commits, ms))) = (&self.btrfs_sysfs, commits_before) {
            let (commits_after, ms_after) = commit_stats(dir)?;
            let n = commits_after.saturating_sub(commits);
            self.out
                .emit(name, "btrfs.commits", n as f64, "count", Better::None, 1);
            self.out.emit(
                name,
                "btrfs.commit-time",
                ms_after.saturating_sub(ms) as f64,
                "ms",
                Better::None,
                1,
            );
        }
        eprintln!(
            "bench: {name} done in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        self.settle().await
    }

    async fn settle(&self) -> Result<(), String> {
        if let Some(p) = &self.settle_path {
            syncfs_path(p)?;
        }
        tokio::time::sleep(self.scale.settle).await;
        Ok(())
    }

    fn key(&self, parts: std::fmt::Arguments<'_>) -> String {
        format!("{}/{parts}", self.run)
    }

    fn mount_dir(&self, name: &str) -> Result<PathBuf, String> {
        let dir = self.work_dir.join(format!("mnt-{name}"));
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// A committed snapshot holding one small file, to prepare on.
    async fn make_base(&self, conn: &mut Conn, tag: &str) -> Result<String, String> {
        let key = self.key(format_args!("{tag}/base-active"));
        let name = self.key(format_args!("{tag}/base"));
        let mounts = conn.prepare(&key, "", HashMap::new()).await?;
        let m = mount_all(&mounts, &self.mount_dir(tag)?)?;
        write_file(&m.path().join("base.txt"), FILE_SIZE)?;
        m.unmount()?;
        conn.commit(&name, &key).await?;
        Ok(name)
    }

    /// Prepare on a committed base, Commit, Remove: latency of each.
    async fn cycles(&mut self) -> Result<(), String> {
        let mut conn = self.target.connect().await?;
        let base = self.make_base(&mut conn, "cycles").await?;
        let (mut prepare, mut commit, mut remove) =
            (Samples::default(), Samples::default(), Samples::default());
        for i in 0..self.scale.cycles {
            let key = self.key(format_args!("cycles/{i}/active"));
            let name = self.key(format_args!("cycles/{i}/committed"));
            let t = Instant::now();
            conn.prepare(&key, &base, HashMap::new()).await?;
            prepare.push(t.elapsed());
            let t = Instant::now();
            conn.commit(&name, &key).await?;
            commit.push(t.elapsed());
            let t = Instant::now();
            conn.remove(&name).await?;
            remove.push(t.elapsed());
        }
        conn.remove(&base).await?;
        self.out.latency("cycles", "prepare", &prepare);
        self.out.latency("cycles", "commit", &commit);
        self.out.latency("cycles", "remove", &remove);
        Ok(())
    }

    /// A chain of layers (prepare, mount, write a file, unmount, commit),
    /// then a View of its top, mounted and checked.
    async fn chain(&mut self) -> Result<(), String> {
        let mut conn = self.target.connect().await?;
        let dir = self.mount_dir("chain")?;
        let n = self.scale.chain;
        let mut layers = Vec::with_capacity(n);
        let (mut layer, mut prepare, mut mount, mut commit) = (
            Samples::default(),
            Samples::default(),
            Samples::default(),
            Samples::default(),
        );
        let mut parent = String::new();
        let started = Instant::now();
        for i in 0..n {
            let key = self.key(format_args!("chain/{i}/active"));
            let name = self.key(format_args!("chain/{i}/layer"));
            let t0 = Instant::now();
            let mounts = conn.prepare(&key, &parent, HashMap::new()).await?;
            let t1 = Instant::now();
            let m = mount_all(&mounts, &dir)?;
            write_file(&m.path().join(format!("layer-{i:04}")), FILE_SIZE)?;
            m.unmount()?;
            let t2 = Instant::now();
            conn.commit(&name, &key).await?;
            let t3 = Instant::now();
            prepare.push(t1 - t0);
            mount.push(t2 - t1);
            commit.push(t3 - t2);
            layer.push(t3 - t0);
            layers.push(name.clone());
            parent = name;
        }
        let total = started.elapsed();
        self.out.emit(
            "chain",
            &format!("{n}-layers.total"),
            total.as_secs_f64() * 1000.0,
            "ms",
            Better::Lower,
            n,
        );
        self.out.latency("chain", "layer", &layer);
        self.out.latency("chain", "prepare", &prepare);
        self.out.latency("chain", "mount+write", &mount);
        self.out.latency("chain", "commit", &commit);

        let (mut view, mut view_mount) = (Samples::default(), Samples::default());
        for v in 0..self.scale.views {
            let key = self.key(format_args!("chain/view-{v}"));
            let t = Instant::now();
            let mounts = conn.view(&key, &parent).await?;
            view.push(t.elapsed());
            let t = Instant::now();
            let m = mount_all(&mounts, &dir)?;
            view_mount.push(t.elapsed());
            let seen = count_layer_files(m.path())?;
            m.unmount()?;
            if seen != n {
                return Err(format!(
                    "the View of the top layer shows {seen} layer files, expected {n}"
                ));
            }
            conn.remove(&key).await?;
        }
        self.out.latency("chain", "view", &view);
        self.out.latency("chain", "view.mount", &view_mount);
        for name in layers.iter().rev() {
            conn.remove(name).await?;
        }
        Ok(())
    }

    /// Usage of an active snapshot as it fills with small files; the bytes
    /// reported are compared with the bytes written.
    async fn usage(&mut self) -> Result<(), String> {
        let mut conn = self.target.connect().await?;
        let base = self.make_base(&mut conn, "usage").await?;
        let key = self.key(format_args!("usage/active"));
        let mounts = conn.prepare(&key, &base, HashMap::new()).await?;
        let m = mount_all(&mounts, &self.mount_dir("usage")?)?;
        let mut written = 0usize;
        for &files in &self.scale.usage_files {
            let t = Instant::now();
            fill(m.path(), written, files)?;
            written = files;
            // Quota figures move when btrfs commits a transaction (every 30 s,
            // or on a sync): sync so every snapshotter sees the files.
            syncfs_path(m.path())?;
            eprintln!(
                "bench: wrote {files} files in {:.1}s",
                t.elapsed().as_secs_f64()
            );
            let mut samples = Samples::default();
            let mut last = (0, 0);
            for _ in 0..self.scale.usage_calls_at(files) {
                let t = Instant::now();
                last = conn.usage(&key).await?;
                samples.push(t.elapsed());
            }
            let tag = format!("{files}-files");
            self.out.latency("usage", &tag, &samples);
            let bytes = (files * FILE_SIZE) as f64;
            self.out.emit(
                "usage",
                &format!("{tag}.bytes-reported"),
                last.0 as f64,
                "bytes",
                Better::None,
                1,
            );
            self.out.emit(
                "usage",
                &format!("{tag}.bytes-written"),
                bytes,
                "bytes",
                Better::None,
                1,
            );
            self.out.emit(
                "usage",
                &format!("{tag}.bytes-error"),
                (last.0 as f64 - bytes) / bytes * 100.0,
                "%",
                Better::None,
                1,
            );
            self.out.emit(
                "usage",
                &format!("{tag}.inodes-reported"),
                last.1 as f64,
                "count",
                Better::None,
                1,
            );
        }
        m.unmount()?;
        conn.remove(&key).await?;
        conn.remove(&base).await?;
        Ok(())
    }

    /// List over many snapshots: no filter, a name filter, a label filter.
    async fn list(&mut self) -> Result<(), String> {
        let n = self.scale.list_snapshots;
        let groups = 10;
        let keys: Vec<String> = (0..n)
            .map(|i| self.key(format_args!("list/{i:05}")))
            .collect();
        let run = self.run.clone();
        let created = for_each_concurrently(&self.target, 8, &keys, move |conn, i, key| {
            let labels =
                HashMap::from([(GROUP_LABEL.to_string(), format!("{run}-g{}", i % groups))]);
            Box::pin(async move { conn.prepare(&key, "", labels).await.map(|_| ()) })
        })
        .await?;
        eprintln!(
            "bench: created {n} snapshots in {:.1}s",
            created.as_secs_f64()
        );

        let mut conn = self.target.connect().await?;
        let probe = &keys[n / 2];
        let variants = [
            ("all", vec![], None),
            ("name-filter", vec![format!("name=={probe}")], Some(1)),
            (
                "label-filter",
                vec![format!("labels.\"{GROUP_LABEL}\"=={}-g3", self.run)],
                Some((0..n).filter(|i| i % groups == 3).count()),
            ),
        ];
        for (tag, filters, expect) in variants {
            let mut samples = Samples::default();
            let mut got = 0;
            for _ in 0..self.scale.list_calls {
                let t = Instant::now();
                got = conn.list(&filters).await?.len();
                samples.push(t.elapsed());
            }
            match expect {
                Some(e) if got != e => {
                    return Err(format!(
                        "List {filters:?} returned {got} snapshots, expected {e}"
                    ));
                }
                None if got < n => {
                    return Err(format!("List returned {got} snapshots, expected >= {n}"));
                }
                _ => {}
            }
            self.out.latency("list", tag, &samples);
            self.out.emit(
                "list",
                &format!("{tag}.returned"),
                got as f64,
                "count",
                Better::None,
                1,
            );
        }
        for_each_concurrently(&self.target, 8, &keys, |conn, _, key| {
            Box::pin(async move { conn.remove(&key).await })
        })
        .await?;
        Ok(())
    }

    /// Clients, each on its own connection, each doing Prepare, Mounts,
    /// Stat, Usage, Commit, Stat, Remove in a loop: throughput and latency,
    /// with one client and with many.
    async fn concurrent(&mut self) -> Result<(), String> {
        let mut conn = self.target.connect().await?;
        let base = self.make_base(&mut conn, "concurrent").await?;
        let mut counts = vec![1];
        if self.scale.clients > 1 {
            counts.push(self.scale.clients);
        }
        for clients in counts {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let target = self.target.clone();
                let base = base.clone();
                let prefix = self.key(format_args!("concurrent/{clients}/{c}"));
                let iterations = self.scale.client_iterations;
                tasks.push(tokio::spawn(async move {
                    mixed_client(&target, &base, &prefix, iterations).await
                }));
            }
            let mut all = Samples::default();
            for t in tasks {
                let s = t.await.map_err(|e| format!("client task: {e}"))??;
                all.extend(&s);
            }
            let wall = started.elapsed();
            let tag = format!("{clients}-clients");
            self.out.emit(
                "concurrent",
                &format!("{tag}.throughput"),
                all.len() as f64 / wall.as_secs_f64(),
                "ops/s",
                Better::Higher,
                all.len(),
            );
            self.out.latency("concurrent", &tag, &all);
        }
        conn.remove(&base).await?;
        Ok(())
    }

    /// Commit latency of freshly written layers, small and large, then of
    /// many clients committing at the same moment. Each layer is prepared
    /// without a parent (so every snapshotter hands out a plain or btrfs
    /// mount, whose unmount does not sync; an overlay's would), mounted,
    /// written, unmounted; only the Commit is timed. With `btrfs_sysfs`,
    /// the btrfs transaction commits during the Commits are counted too:
    /// concurrent Commits that share their syncs cause fewer per Commit;
    /// the time until all of them are acknowledged shows what sharing
    /// saves.
    async fn commits(&mut self) -> Result<(), String> {
        let mut conn = self.target.connect().await?;
        for (tag, (shape, reps)) in [
            ("small", self.scale.commit_small),
            ("large", self.scale.commit_large),
        ] {
            let dir = self.mount_dir(&format!("commits-{tag}"))?;
            let mut samples = Samples::default();
            let (mut txns, mut bytes) = (Some(0u64), 0u64);
            self.between_commits().await?;
            for i in 0..reps {
                let key = self.key(format_args!("commits/{tag}/{i}/active"));
                let name = self.key(format_args!("commits/{tag}/{i}/committed"));
                let mounts = conn.prepare(&key, "", HashMap::new()).await?;
                bytes = write_layer(mounts, dir.clone(), shape, 0).await?;
                let before = self.btrfs_commits()?;
                let t = Instant::now();
                conn.commit(&name, &key).await?;
                samples.push(t.elapsed());
                txns = add_delta(txns, before, self.btrfs_commits()?);
                conn.remove(&name).await?;
                self.between_commits().await?;
            }
            self.out.emit(
                "commits",
                &format!("{tag}.layer-size"),
                bytes as f64 / (1 << 20) as f64,
                "MiB",
                Better::None,
                1,
            );
            self.out.latency("commits", tag, &samples);
            self.emit_txns_per_commit(tag, txns, samples.len());
        }
        self.concurrent_commits().await
    }

    /// The concurrent part of [`Self::commits`]: every client prepares and
    /// writes its layer, then all Commit at once (a barrier), round after
    /// round.
    async fn concurrent_commits(&mut self) -> Result<(), String> {
        let (clients, shape, rounds) = self.scale.commit_clients;
        let mut conn = self.target.connect().await?;
        let (mut samples, mut all_done) = (Samples::default(), Samples::default());
        let mut txns = Some(0u64);
        for round in 0..rounds {
            // Clients plus this task: all written, then all go.
            let ready = Arc::new(Barrier::new(clients + 1));
            let go = Arc::new(Barrier::new(clients + 1));
            let mut tasks = Vec::new();
            for c in 0..clients {
                let target = self.target.clone();
                let (ready, go) = (ready.clone(), go.clone());
                let key = self.key(format_args!("commits/clients/{round}/{c}/active"));
                let name = self.key(format_args!("commits/clients/{round}/{c}/committed"));
                let dir = self.mount_dir(&format!("commits-client-{c}"))?;
                tasks.push(tokio::spawn(async move {
                    let prepared = async {
                        let mut conn = target.connect().await?;
                        let mounts = conn.prepare(&key, "", HashMap::new()).await?;
                        write_layer(mounts, dir, shape, c as u32).await?;
                        Ok::<_, String>(conn)
                    }
                    .await;
                    // Pass both barriers even after an error, so that
                    // nobody waits for this client for ever.
                    ready.wait().await;
                    go.wait().await;
                    let mut conn = prepared?;
                    let started = Instant::now();
                    conn.commit(&name, &key).await?;
                    Ok::<_, String>((name, started, Instant::now()))
                }));
            }
            ready.wait().await;
            let before = self.btrfs_commits()?;
            go.wait().await;
            let mut names = Vec::new();
            let mut first_err = None;
            let mut span: Option<(Instant, Instant)> = None;
            for t in tasks {
                match t
                    .await
                    .map_err(|e| format!("client task: {e}"))
                    .and_then(|r| r)
                {
                    Ok((name, started, finished)) => {
                        samples.push(finished - started);
                        names.push(name);
                        span = Some(span.map_or((started, finished), |(a, b)| {
                            (a.min(started), b.max(finished))
                        }));
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            txns = add_delta(txns, before, self.btrfs_commits()?);
            if let Some((first, last)) = span {
                all_done.push(last - first);
            }
            for name in &names {
                conn.remove(name).await?;
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            self.between_commits().await?;
        }
        let tag = format!("{clients}-clients");
        self.out.latency("commits", &tag, &samples);
        self.out
            .latency("commits", &format!("{tag}.all-committed"), &all_done);
        self.emit_txns_per_commit(&tag, txns, samples.len());
        Ok(())
    }

    /// After a Remove of the commits workload: the pause for deferred
    /// deletions, then a sync, so the next Commit pays only for its own
    /// layer.
    async fn between_commits(&self) -> Result<(), String> {
        tokio::time::sleep(self.scale.commit_pause).await;
        if let Some(p) = &self.settle_path {
            syncfs_path(p)?;
        }
        Ok(())
    }

    /// The btrfs's transaction commits so far (None without `btrfs_sysfs`).
    fn btrfs_commits(&self) -> Result<Option<u64>, String> {
        match &self.btrfs_sysfs {
            Some(dir) => Ok(Some(commit_stats(dir)?.0)),
            None => Ok(None),
        }
    }

    fn emit_txns_per_commit(&mut self, tag: &str, txns: Option<u64>, commits: usize) {
        if let Some(n) = txns
            && commits > 0
        {
            self.out.emit(
                "commits",
                &format!("{tag}.btrfs-commits-per-commit"),
                n as f64 / commits as f64,
                "count",
                Better::None,
                commits,
            );
        }
    }
}

/// Adds `after - before` to a running count (None when not counted).
fn add_delta(total: Option<u64>, before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(total? + after?.saturating_sub(before?))
}

/// Mounts `mounts` on `dir`, writes a layer of `shape` into it and
/// unmounts, off the async threads. Returns the bytes written.
async fn write_layer(
    mounts: Vec<crate::proto::containerd::types::Mount>,
    dir: PathBuf,
    shape: LayerShape,
    writer: u32,
) -> Result<u64, String> {
    tokio::task::spawn_blocking(move || {
        let m = mount_all(&mounts, &dir)?;
        let bytes = shape.write(m.path(), writer)?;
        m.unmount()?;
        Ok(bytes)
    })
    .await
    .map_err(|e| format!("writing a layer: {e}"))?
}

/// One client of the concurrent workload; returns the latency of every call.
async fn mixed_client(
    target: &Target,
    base: &str,
    prefix: &str,
    iterations: usize,
) -> Result<Samples, String> {
    let mut conn = target.connect().await?;
    let mut s = Samples::default();
    for i in 0..iterations {
        let key = format!("{prefix}/{i}/active");
        let name = format!("{prefix}/{i}/committed");
        let t = Instant::now();
        conn.prepare(&key, base, HashMap::new()).await?;
        s.push(t.elapsed());
        let t = Instant::now();
        conn.mounts(&key).await?;
        s.push(t.elapsed());
        let t = Instant::now();
        conn.stat(&key).await?;
        s.push(t.elapsed());
        let t = Instant::now();
        conn.usage(&key).await?;
        s.push(t.elapsed());
        let t = Instant::now();
        conn.commit(&name, &key).await?;
        s.push(t.elapsed());
        let t = Instant::now();
        conn.stat(&name).await?;
        s.push(t.elapsed());
        let t = Instant::now();
        conn.remove(&name).await?;
        s.push(t.elapsed());
    }
    Ok(s)
}

/// A boxed future borrowing a connection.
type ConnFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// Runs `f(conn, index, key)` for every key, on `workers` connections at
/// once; returns the wall time.
async fn for_each_concurrently<F>(
    target: &Target,
    workers: usize,
    keys: &[String],
    f: F,
) -> Result<Duration, String>
where
    F: for<'a> Fn(&'a mut Conn, usize, String) -> ConnFuture<'a> + Send + Sync + Clone + 'static,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers.max(1) {
        let target = target.clone();
        let mine: Vec<(usize, String)> = keys
            .iter()
            .enumerate()
            .skip(w)
            .step_by(workers.max(1))
            .map(|(i, k)| (i, k.clone()))
            .collect();
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = target.connect().await?;
            for (i, key) in mine {
                f(&mut conn, i, key).await?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("worker task: {e}"))??;
    }
    Ok(started.elapsed())
}

/// Creates `count` empty active snapshots (no parent) on `workers`
/// connections; returns the wall time.
pub async fn populate(
    target: &Target,
    prefix: &str,
    count: usize,
    workers: usize,
) -> Result<Duration, String> {
    let keys: Vec<String> = (0..count).map(|i| format!("{prefix}/{i:06}")).collect();
    for_each_concurrently(target, workers, &keys, |conn, _, key| {
        Box::pin(async move { conn.prepare(&key, "", HashMap::new()).await.map(|_| ()) })
    })
    .await
}

/// Writes a file of `size` bytes.
fn write_file(path: &Path, size: usize) -> Result<(), String> {
    let data = vec![b'x'; size];
    fs::write(path, data).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Writes files `from..to` (FILE_SIZE bytes each) under `root`, in
/// directories of FILES_PER_DIR.
fn fill(root: &Path, from: usize, to: usize) -> Result<(), String> {
    let data = vec![b'y'; FILE_SIZE];
    for i in from..to {
        let dir = root.join(format!("d{:04}", i / FILES_PER_DIR));
        if i % FILES_PER_DIR == 0 || i == from {
            fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let path = dir.join(format!("f{:04}", i % FILES_PER_DIR));
        fs::write(&path, &data).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// How many `layer-*` files a mounted chain shows.
fn count_layer_files(root: &Path) -> Result<usize, String> {
    let entries = fs::read_dir(root).map_err(|e| format!("reading {}: {e}", root.display()))?;
    let mut n = 0;
    for e in entries {
        let e = e.map_err(|e| format!("reading {}: {e}", root.display()))?;
        if e.file_name().to_string_lossy().starts_with("layer-") {
            n += 1;
        }
    }
    Ok(n)
}

/// (transaction commits, total commit milliseconds) of a btrfs, from its
/// sysfs `commit_stats`.
fn commit_stats(dir: &Path) -> Result<(u64, u64), String> {
    let path = dir.join("commit_stats");
    let text = fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no {name} in {}", path.display()))
    };
    Ok((field("commits ")?, field("total_commit_ms ")?))
}

/// `syncfs(2)` on the filesystem holding `path`.
pub fn syncfs_path(path: &Path) -> Result<(), String> {
    let f = fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    nix::unistd::syncfs(&f).map_err(|e| format!("syncfs {}: {e}", path.display()))
}
