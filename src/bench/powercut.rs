//! The power-cut workload behind `cowsnap-powercut` and hack/power-cut.
//!
//! A snapshotter's promise is that a Commit it acknowledged survives losing
//! the machine's memory (docs/design.md, "Durability"). The test runs in a
//! qemu guest: `load` unpacks layers through a snapshots socket (Prepare,
//! write a few thousand files of known content, Commit) and prints one
//! `COWSNAP-PC ACK <name>` line on the serial console the moment each
//! Commit is acknowledged; the host records the console and kills qemu at a
//! random moment, boots the guest again, and `check` compares what the
//! snapshotter kept with what was acknowledged.
//!
//! Layer content is a pure function of the layer's name ([`LayerId`]), so
//! the checker regenerates every byte instead of storing a copy: regular
//! files of mixed sizes (empty to a MiB, plus large ones), nested
//! directories, hard links, symbolic links and varied modes. A layer writes
//! only under its own top-level directory, so the View of a layer shows its
//! own files and its ancestors' directories.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::mount::mount_all;
use super::target::Target;

/// The prefix of every line the workload prints for the host.
pub const LINE_PREFIX: &str = "COWSNAP-PC";
/// The prefix of the names of committed layers.
const NAME_PREFIX: &str = "pc:";
/// The snapshotter's active-snapshot key of a layer is its name plus this.
const ACTIVE_SUFFIX: &str = ":active";

/// The identity of one layer, encoded in its committed name
/// (`pc:r<run>:w<writer>:l<layer>:f<files>:b<large>x<MiB>`): everything
/// needed to regenerate its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerId {
    /// The boot of the guest that wrote it.
    pub run: u32,
    /// The writer (one chain per writer and run).
    pub writer: u32,
    /// Position in the chain (0 has no parent).
    pub layer: u32,
    /// Small and medium files.
    pub files: u32,
    /// Large files.
    pub large: u32,
    /// Size of each large file, MiB.
    pub large_mib: u32,
}

impl LayerId {
    /// The committed snapshot's name.
    pub fn name(&self) -> String {
        format!(
            "{NAME_PREFIX}r{}:w{}:l{}:f{}:b{}x{}",
            self.run, self.writer, self.layer, self.files, self.large, self.large_mib
        )
    }

    /// Parses a name made by [`LayerId::name`]; `None` for other names.
    pub fn parse(name: &str) -> Option<LayerId> {
        let rest = name.strip_prefix(NAME_PREFIX)?;
        let mut parts = rest.split(':');
        let mut num = |p: char| -> Option<u32> { parts.next()?.strip_prefix(p)?.parse().ok() };
        let (run, writer, layer, files) = (num('r')?, num('w')?, num('l')?, num('f')?);
        let (large, large_mib) = parts.next()?.strip_prefix('b')?.split_once('x')?;
        if parts.next().is_some() {
            return None;
        }
        Some(LayerId {
            run,
            writer,
            layer,
            files,
            large: large.parse().ok()?,
            large_mib: large_mib.parse().ok()?,
        })
    }

    /// The name of the layer below it, if any.
    pub fn parent(&self) -> Option<LayerId> {
        self.layer
            .checked_sub(1)
            .map(|layer| LayerId { layer, ..*self })
    }

    /// The top-level directory its files live in.
    fn dir(&self) -> String {
        format!("r{}-w{}-l{}", self.run, self.writer, self.layer)
    }

    fn seed(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in self.name().bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// splitmix64: a tiny, well-mixed generator; content must be cheap to
/// regenerate (debug builds, emulated CPUs).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Content blocks: every 4 KiB block of a file is one pseudo-random block
/// of the file's seed, its first 8 bytes replaced by a value of (seed,
/// block number). Torn, zeroed, shifted or swapped blocks all differ, and
/// filling is a copy per block (fast in debug builds under emulation).
const BLOCK: usize = 4096;

/// Fills `buf` with the bytes at `offset` (a multiple of [`BLOCK`]) of the
/// content of `seed`.
fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    debug_assert_eq!(offset % BLOCK as u64, 0);
    let mut base = [0u8; BLOCK];
    for (i, w) in base.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed ^ ((i as u64) << 32)).to_le_bytes());
    }
    let first = offset / BLOCK as u64;
    for (k, chunk) in buf.chunks_mut(BLOCK).enumerate() {
        let n = chunk.len();
        chunk.copy_from_slice(&base[..n]);
        let tag = mix(seed.rotate_left(17) ^ (first + k as u64)).to_le_bytes();
        let t = n.min(8);
        chunk[..t].copy_from_slice(&tag[..t]);
    }
}

/// One entry of a layer, relative to the layer's directory.
#[derive(Clone, Debug)]
enum Entry {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        size: u64,
        seed: u64,
    },
    /// A hard link to the file at this path.
    HardLink {
        to: String,
    },
    Symlink {
        target: String,
    },
}

/// The layer's entries by path (parents before children in this order).
fn entries(id: &LayerId) -> BTreeMap<String, Entry> {
    let mut rng = Rng(id.seed());
    let mut out = BTreeMap::new();
    let dirs = (id.files / 100).max(1);
    for d in 0..dirs {
        out.insert(format!("d{d}"), Entry::Dir { mode: 0o755 });
        for s in 0..3 {
            let mode = [0o755, 0o750, 0o700][s as usize];
            out.insert(format!("d{d}/s{s}"), Entry::Dir { mode });
        }
    }
    let mut previous: Option<String> = None;
    for i in 0..id.files {
        let d = i % dirs;
        let s = (i / dirs) % 3;
        let path = format!("d{d}/s{s}/f{i}");
        // Mostly small, like the files of an image layer: ~13 KiB on
        // average (~26 MiB for 2000 files), plus the large files.
        let size = match rng.below(100) {
            0 => 0,
            1..=60 => rng.below(4096),
            61..=95 => 4096 + rng.below(28 * 1024),
            _ => 32 * 1024 + rng.below(224 * 1024),
        };
        let mode = [0o644, 0o755, 0o600, 0o640][rng.below(4) as usize];
        out.insert(
            path.clone(),
            Entry::File {
                mode,
                size,
                seed: rng.next(),
            },
        );
        if i % 37 == 36
            && let Some(to) = &previous
        {
            out.insert(
                format!("d{}/hl{i}", (d + 1) % dirs),
                Entry::HardLink { to: to.clone() },
            );
        }
        if i % 101 == 100 {
            out.insert(
                format!("d{d}/sl{i}"),
                Entry::Symlink {
                    target: format!("s{s}/f{i}"),
                },
            );
        }
        previous = Some(path);
    }
    for j in 0..id.large {
        out.insert(
            format!("big{j}"),
            Entry::File {
                mode: 0o644,
                size: u64::from(id.large_mib) << 20,
                seed: rng.next(),
            },
        );
    }
    out
}

const CHUNK: usize = 1 << 20;

/// Writes layer `id` under `root` (no fsync: making it durable is the
/// snapshotter's Commit's job). Returns the bytes written.
pub fn materialize(root: &Path, id: &LayerId) -> Result<u64, String> {
    let base = root.join(id.dir());
    let ctx = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    fs::create_dir(&base).map_err(|e| ctx(&base, e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0;
    let all = entries(id);
    // Directories first; their modes are set after their contents.
    for (path, e) in &all {
        if let Entry::Dir { .. } = e {
            let p = base.join(path);
            fs::create_dir(&p).map_err(|e| ctx(&p, e))?;
        }
    }
    // Files, then links to them (a link may sort before its target).
    let files = all.iter().filter(|(_, e)| matches!(e, Entry::File { .. }));
    let links = all
        .iter()
        .filter(|(_, e)| matches!(e, Entry::HardLink { .. } | Entry::Symlink { .. }));
    for (path, e) in files.chain(links) {
        let p = base.join(path);
        match e {
            Entry::Dir { .. } => {}
            Entry::File { mode, size, seed } => {
                let mut f = File::create(&p).map_err(|e| ctx(&p, e))?;
                let mut off = 0u64;
                while off < *size {
                    let n = (*size - off).min(CHUNK as u64) as usize;
                    fill(*seed, off, &mut buf[..n]);
                    f.write_all(&buf[..n]).map_err(|e| ctx(&p, e))?;
                    off += n as u64;
                }
                f.set_permissions(fs::Permissions::from_mode(*mode))
                    .map_err(|e| ctx(&p, e))?;
                bytes += size;
            }
            Entry::HardLink { to } => fs::hard_link(base.join(to), &p).map_err(|e| ctx(&p, e))?,
            Entry::Symlink { target } => symlink(target, &p).map_err(|e| ctx(&p, e))?,
        }
    }
    for (path, e) in &all {
        if let Entry::Dir { mode } = e {
            let p = base.join(path);
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(|e| ctx(&p, e))?;
        }
    }
    Ok(bytes)
}

/// Compares layer `id` under `root` with what [`materialize`] wrote, and
/// checks its ancestors' directories are there. Returns the differences
/// (empty: intact), at most a few dozen described.
pub fn verify(root: &Path, id: &LayerId) -> Vec<String> {
    const MAX: usize = 20;
    let mut problems = Vec::new();
    let mut more = 0usize;
    let mut note = |problems: &mut Vec<String>, s: String| {
        if problems.len() < MAX {
            problems.push(s);
        } else {
            more += 1;
        }
    };
    let mut ancestor = id.parent();
    while let Some(a) = ancestor {
        if !root.join(a.dir()).is_dir() {
            note(
                &mut problems,
                format!("ancestor directory {} missing", a.dir()),
            );
        }
        ancestor = a.parent();
    }
    let base = root.join(id.dir());
    let all = entries(id);
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    for (path, e) in &all {
        let p = base.join(path);
        let md = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(err) => {
                note(&mut problems, format!("{path}: {err}"));
                continue;
            }
        };
        match e {
            Entry::Dir { mode } => {
                if !md.is_dir() || md.mode() & 0o7777 != *mode {
                    note(
                        &mut problems,
                        format!(
                            "{path}: want a directory of mode {mode:o}, found mode {:o}",
                            md.mode()
                        ),
                    );
                }
            }
            Entry::File { mode, size, seed } => {
                if !md.is_file() || md.mode() & 0o7777 != *mode {
                    note(
                        &mut problems,
                        format!(
                            "{path}: want a file of mode {mode:o}, found mode {:o}",
                            md.mode()
                        ),
                    );
                    continue;
                }
                if md.len() != *size {
                    note(
                        &mut problems,
                        format!("{path}: size {} (want {size})", md.len()),
                    );
                    continue;
                }
                if let Err(s) = compare(&p, *seed, *size, &mut buf, &mut want) {
                    note(&mut problems, format!("{path}: {s}"));
                }
            }
            Entry::HardLink { to } => match fs::symlink_metadata(base.join(to)) {
                Ok(t) if t.ino() == md.ino() && t.dev() == md.dev() => {}
                Ok(_) => note(&mut problems, format!("{path}: not a hard link of {to}")),
                Err(err) => note(
                    &mut problems,
                    format!("{path}: its link target {to}: {err}"),
                ),
            },
            Entry::Symlink { target } => match fs::read_link(&p) {
                Ok(t) if t == Path::new(target) => {}
                Ok(t) => note(
                    &mut problems,
                    format!("{path}: symlink to {} (want {target})", t.display()),
                ),
                Err(err) => note(&mut problems, format!("{path}: {err}")),
            },
        }
    }
    // Nothing more than was written.
    let mut found = BTreeSet::new();
    if let Err(e) = walk(&base, &base, &mut found) {
        note(&mut problems, format!("listing {}: {e}", base.display()));
    }
    for extra in found.iter().filter(|p| !all.contains_key(*p)) {
        note(&mut problems, format!("{extra}: not written by the layer"));
    }
    if more > 0 {
        problems.push(format!("... and {more} more"));
    }
    problems
}

fn compare(p: &Path, seed: u64, size: u64, buf: &mut [u8], want: &mut [u8]) -> Result<(), String> {
    let mut f = File::open(p).map_err(|e| e.to_string())?;
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        f.read_exact(&mut buf[..n])
            .map_err(|e| format!("reading at {off}: {e}"))?;
        fill(seed, off, &mut want[..n]);
        if buf[..n] != want[..n] {
            let at = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let zero = buf[..n].iter().all(|b| *b == 0);
            return Err(format!(
                "content differs at byte {}{}",
                off + at as u64,
                if zero { " (a block of zeros)" } else { "" }
            ));
        }
        off += n as u64;
    }
    Ok(())
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if let Ok(rel) = p.strip_prefix(base) {
            out.insert(rel.to_string_lossy().into_owned());
        }
        if e.file_type()?.is_dir() {
            walk(base, &p, out)?;
        }
    }
    Ok(())
}

/// Prints one line for the host on stdout (the guest's serial console)
/// and flushes it before returning.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{LINE_PREFIX} {line}");
    let _ = out.flush();
}

/// What `load` does.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadOptions {
    /// This boot's number: names the layers it writes.
    #[arg(long)]
    pub run: u32,
    /// Concurrent layer writers (one chain each).
    #[arg(long, default_value_t = 3)]
    pub writers: u32,
    /// Concurrent "containers": active snapshots written without end.
    #[arg(long, default_value_t = 1)]
    pub containers: u32,
    /// Small and medium files per layer.
    #[arg(long, default_value_t = 2000)]
    pub files: u32,
    /// Large files per layer.
    #[arg(long, default_value_t = 1)]
    pub large: u32,
    /// Size of each large file, MiB.
    #[arg(long, default_value_t = 8)]
    pub large_mib: u32,
    /// Directory for mount points.
    #[arg(long, default_value = "/tmp/cowsnap-powercut")]
    pub work_dir: PathBuf,
    /// Stop after this many seconds instead of running until killed (the
    /// power cut).
    #[arg(long = "duration-s", value_parser = parse_seconds)]
    pub duration: Option<Duration>,
    /// When the load started (the ACK lines say how long after).
    #[arg(skip = Instant::now())]
    pub started: Instant,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))
}

/// Unpacks layers until killed (or `duration`), announcing every
/// acknowledged Commit. Errors end the load: the host sees the guest
/// finish before the cut and fails the run.
pub async fn load(target: &Target, opts: &LoadOptions) -> Result<(), String> {
    fs::create_dir_all(&opts.work_dir)
        .map_err(|e| format!("creating {}: {e}", opts.work_dir.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (first_tx, first_rx) = watch::channel(None::<String>);
    let first_tx = Arc::new(first_tx);
    let mut tasks = Vec::new();
    say(&format!(
        "LOADING run={} writers={} containers={} files={} large={}x{}MiB",
        opts.run, opts.writers, opts.containers, opts.files, opts.large, opts.large_mib
    ));
    for w in 0..opts.writers {
        let (target, opts, stop, first_tx) =
            (target.clone(), opts.clone(), stop.clone(), first_tx.clone());
        tasks.push(tokio::spawn(async move {
            writer(&target, &opts, w, &stop, &first_tx).await
        }));
    }
    for c in 0..opts.containers {
        let (target, opts, stop, mut first) =
            (target.clone(), opts.clone(), stop.clone(), first_rx.clone());
        tasks.push(tokio::spawn(async move {
            let base = loop {
                if let Some(b) = first.borrow().clone() {
                    break b;
                }
                first.changed().await.map_err(|e| e.to_string())?;
            };
            container(&target, &opts, c, &base, &stop).await
        }));
    }
    if let Some(d) = opts.duration {
        tokio::time::sleep(d).await;
        stop.store(true, Ordering::SeqCst);
    }
    let mut result = Ok(());
    for t in tasks {
        let r = t.await.map_err(|e| format!("task: {e}")).and_then(|r| r);
        if let Err(e) = r {
            say(&format!("ERROR {e}"));
            stop.store(true, Ordering::SeqCst);
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

async fn writer(
    target: &Target,
    opts: &LoadOptions,
    w: u32,
    stop: &AtomicBool,
    first: &watch::Sender<Option<String>>,
) -> Result<(), String> {
    let mut conn = target.connect().await?;
    let dir = opts.work_dir.join(format!("w{w}"));
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut parent = String::new();
    let mut layer = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let id = LayerId {
            run: opts.run,
            writer: w,
            layer,
            files: opts.files,
            large: opts.large,
            large_mib: opts.large_mib,
        };
        let name = id.name();
        let key = format!("{name}{ACTIVE_SUFFIX}");
        let mounts = conn.prepare(&key, &parent, HashMap::new()).await?;
        let d = dir.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            unpack_into(&mounts, &d, |root| materialize(root, &id))
        })
        .await
        .map_err(|e| format!("writing {name}: {e}"))??;
        let t = Instant::now();
        conn.commit(&name, &key).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        say(&format!(
            "ACK {name} commit_ms={ms:.1} bytes={bytes} t={:.1}",
            opts.started.elapsed().as_secs_f64()
        ));
        if w == 0 && layer == 0 {
            first.send_replace(Some(name.clone()));
        }
        // Every third layer, an unpack that fails half way: its active
        // snapshot is removed, as containerd does.
        if layer % 3 == 2 {
            let key = format!("{name}:aborted");
            let mounts = conn.prepare(&key, &name, HashMap::new()).await?;
            let d = dir.clone();
            tokio::task::spawn_blocking(move || {
                unpack_into(&mounts, &d, |root| {
                    let p = root.join("partial");
                    fs::write(&p, vec![7u8; 300 << 10]).map_err(|e| format!("{}: {e}", p.display()))
                })
            })
            .await
            .map_err(|e| format!("writing {key}: {e}"))??;
            conn.remove(&key).await?;
        }
        parent = name;
        layer += 1;
    }
    Ok(())
}

/// Runs `write` on the directory a layer is unpacked into, as containerd's
/// diff applier does: straight into an overlay's upper directory (no
/// mount), else on a temporary mount at `dir`.
fn unpack_into<T>(
    mounts: &[crate::proto::containerd::types::Mount],
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<T, String>,
) -> Result<T, String> {
    if let Some(upper) = overlay_upper(mounts) {
        return write(&upper);
    }
    let m = mount_all(mounts, dir)?;
    let out = write(m.path())?;
    m.unmount()?;
    Ok(out)
}

/// The upper directory of a single overlay mount: where containerd 1.6's
/// diff applier (`diff/apply`) unpacks a layer for the overlayfs
/// snapshotter, without mounting it. Unmounting an overlay syncs its upper
/// filesystem, a side effect a real unpack does not have.
fn overlay_upper(mounts: &[crate::proto::containerd::types::Mount]) -> Option<PathBuf> {
    match mounts {
        [m] if m.r#type == "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from),
        _ => None,
    }
}

/// A running container: an active snapshot whose files are written,
/// rewritten and deleted without end (never committed).
async fn container(
    target: &Target,
    opts: &LoadOptions,
    c: u32,
    base: &str,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut conn = target.connect().await?;
    let key = format!("pc-container:r{}:c{c}", opts.run);
    let mounts = conn.prepare(&key, base, HashMap::new()).await?;
    let dir = opts.work_dir.join(format!("c{c}"));
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let m = mount_all(&mounts, &dir)?;
    let root = m.path().to_owned();
    let stop_flag = Arc::new(AtomicBool::new(false));
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) && !stop_flag.load(Ordering::SeqCst) {
        let root = root.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let p = root.join(format!("log{}", n % 16));
            let mut buf = vec![0u8; 256 << 10];
            fill(n, 0, &mut buf);
            fs::write(&p, &buf).map_err(|e| format!("{}: {e}", p.display()))
        })
        .await
        .map_err(|e| e.to_string())??;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.unmount()?;
    Ok(())
}

/// What `check` found, printed as one JSON line.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    /// Acknowledged Commits looked for (all runs not pruned earlier).
    pub acked: usize,
    /// Of them, found committed and compared byte for byte.
    pub acked_verified: usize,
    /// Of them, found committed and only stat-ed (older runs, pruned
    /// from full comparison).
    pub acked_present: usize,
    /// Acknowledged but not there (or not committed).
    pub lost: Vec<String>,
    /// Committed (acknowledged or not) but with content that differs.
    pub torn: Vec<String>,
    /// Committed without an acknowledgement, and intact.
    pub unacked_complete: usize,
    /// Active snapshots left (unfinished unpacks, containers).
    pub active: usize,
    /// Snapshots removed to keep the disk from filling (older runs).
    pub pruned: usize,
    /// The differences found, by snapshot (a few each).
    pub details: BTreeMap<String, Vec<String>>,
    /// Seconds the check took.
    pub seconds: f64,
}

impl CheckReport {
    /// Nothing acknowledged was lost or torn, and nothing kept is torn.
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.torn.is_empty()
    }
}

/// What `check` does.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckOptions {
    /// Names acknowledged so far (the file named on the command line: one
    /// name per line).
    #[arg(long = "acked", value_name = "FILE", value_parser = read_acked)]
    pub acked: BTreeSet<String>,
    /// Compare byte for byte every committed layer of this run or later
    /// (older ones are only checked to exist).
    #[arg(long, default_value_t = 0)]
    pub full_from_run: u32,
    /// Afterwards, remove the layers of runs before this one.
    #[arg(long, default_value_t = 0)]
    pub prune_before_run: u32,
    /// Layers of runs before this one were removed by an earlier check:
    /// their acknowledgements are not looked for.
    #[arg(long, default_value_t = 0)]
    pub pruned_before_run: u32,
    /// Directory for mount points.
    #[arg(long, default_value = "/tmp/cowsnap-powercut")]
    pub work_dir: PathBuf,
}

/// The acknowledgements file: one name per line, blank lines ignored.
fn read_acked(path: &str) -> Result<BTreeSet<String>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Checks every committed layer the snapshotter lists against the
/// acknowledgements (see [`CheckReport`]).
pub async fn check(target: &Target, opts: &CheckOptions) -> Result<CheckReport, String> {
    let t0 = Instant::now();
    fs::create_dir_all(&opts.work_dir)
        .map_err(|e| format!("creating {}: {e}", opts.work_dir.display()))?;
    let mut conn = target.connect().await?;
    let infos = conn.list(&[]).await?;
    let acked: BTreeSet<&String> = opts
        .acked
        .iter()
        .filter(|n| LayerId::parse(n).is_none_or(|id| id.run >= opts.pruned_before_run))
        .collect();
    let mut report = CheckReport {
        acked: acked.len(),
        ..CheckReport::default()
    };
    let mut committed: BTreeMap<LayerId, String> = BTreeMap::new();
    for info in &infos {
        // Kind 3 = committed in containerd's API (1 view, 2 active).
        if info.kind == 3 {
            if let Some(id) = LayerId::parse(&info.name) {
                let want_parent = id.parent().map(|p| p.name()).unwrap_or_default();
                if info.parent != want_parent {
                    report.details.insert(
                        info.name.clone(),
                        vec![format!("parent {:?} (want {want_parent:?})", info.parent)],
                    );
                    report.torn.push(info.name.clone());
                    continue;
                }
                committed.insert(id, info.name.clone());
            }
        } else {
            report.active += 1;
        }
    }
    let present: BTreeSet<&String> = committed.values().collect();
    for name in &acked {
        if !present.contains(name) && !report.torn.contains(name) {
            report.lost.push((*name).clone());
        }
    }
    let dir = opts.work_dir.join("view");
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for (id, name) in &committed {
        let acked = acked.contains(name);
        if id.run < opts.full_from_run {
            if acked {
                report.acked_present += 1;
            }
            continue;
        }
        let view = format!("pc-check:{name}");
        // A view left by an earlier check that was cut.
        let _ = conn.remove(&view).await;
        let mounts = conn.view(&view, name).await?;
        let (d, id2) = (dir.clone(), *id);
        let problems = tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
            let m = mount_all(&mounts, &d)?;
            let p = verify(m.path(), &id2);
            m.unmount()?;
            Ok(p)
        })
        .await
        .map_err(|e| format!("checking {name}: {e}"))??;
        conn.remove(&view).await?;
        if problems.is_empty() {
            if acked {
                report.acked_verified += 1;
            } else {
                report.unacked_complete += 1;
            }
        } else {
            report.details.insert(name.clone(), problems);
            report.torn.push(name.clone());
        }
    }
    // Prune old runs, children first.
    if opts.prune_before_run > 0 {
        for info in infos.iter().filter(|i| i.kind != 3) {
            if run_of(&info.name).is_some_and(|r| r < opts.prune_before_run) {
                conn.remove(&info.name).await?;
                report.pruned += 1;
            }
        }
        for (id, name) in committed.iter().rev() {
            if id.run < opts.prune_before_run {
                conn.remove(name).await?;
                report.pruned += 1;
            }
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The run a workload key or name belongs to.
fn run_of(key: &str) -> Option<u32> {
    let rest = key
        .strip_prefix(NAME_PREFIX)
        .or_else(|| key.strip_prefix("pc-container:"))?;
    rest.strip_prefix('r')?.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> LayerId {
        LayerId {
            run: 3,
            writer: 1,
            layer: 2,
            files: 300,
            large: 1,
            large_mib: 2,
        }
    }

    #[test]
    fn names_round_trip_and_reject_others() {
        let i = id();
        assert_eq!(LayerId::parse(&i.name()), Some(i));
        assert_eq!(i.parent().unwrap().layer, 1);
        assert_eq!(LayerId::parse("pc:r1:w2"), None);
        assert_eq!(LayerId::parse(&format!("{}:x", i.name())), None);
        assert_eq!(LayerId::parse("cowsnap"), None);
        assert_eq!(run_of(&format!("{}{ACTIVE_SUFFIX}", i.name())), Some(3));
        assert_eq!(run_of("pc-container:r7:c0"), Some(7));
    }

    /// A directory removed when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p =
                std::env::temp_dir().join(format!("cowsnap-powercut-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir(&p).unwrap();
            TempDir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn written_layer_verifies_and_damage_is_found() {
        let tmp = TempDir::new("verify");
        let i = id();
        for a in [i.parent().unwrap().parent().unwrap(), i.parent().unwrap()] {
            fs::create_dir(tmp.path().join(a.dir())).unwrap();
        }
        let bytes = materialize(tmp.path(), &i).unwrap();
        assert!(bytes > 2 << 20 && bytes < 12 << 20, "{bytes}");
        assert_eq!(verify(tmp.path(), &i), Vec::<String>::new());

        // A torn file (zeros, as after a power cut), a missing one, an
        // extra one, a truncated large file: each reported.
        let base = tmp.path().join(i.dir());
        let victim = entries(&i)
            .into_iter()
            .find_map(|(p, e)| match e {
                Entry::File { size, .. } if size > 100 && !p.starts_with("big") => Some(p),
                _ => None,
            })
            .unwrap();
        let len = fs::metadata(base.join(&victim)).unwrap().len() as usize;
        fs::write(base.join(&victim), vec![0u8; len]).unwrap();
        fs::remove_file(base.join("d1/s0/f1")).unwrap();
        fs::write(base.join("d0/extra"), b"x").unwrap();
        File::options()
            .write(true)
            .open(base.join("big0"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        let problems = verify(tmp.path(), &i).join("\n");
        assert!(
            problems.contains(&format!(
                "{victim}: content differs at byte 0 (a block of zeros)"
            )),
            "{problems}"
        );
        assert!(problems.contains("d1/s0/f1: No such file"), "{problems}");
        assert!(
            problems.contains("d0/extra: not written by the layer"),
            "{problems}"
        );
        assert!(problems.contains("big0: size 4096"), "{problems}");

        fs::remove_dir(tmp.path().join(i.parent().unwrap().dir())).unwrap();
        assert!(
            verify(tmp.path(), &i)
                .join("\n")
                .contains("ancestor directory r3-w1-l1 missing")
        );
    }

    #[test]
    fn content_is_a_function_of_the_name() {
        let a = entries(&id());
        let b = entries(&id());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let other = entries(&LayerId { layer: 5, ..id() });
        assert_ne!(format!("{a:?}"), format!("{other:?}"));
        assert!(a.values().any(|e| matches!(e, Entry::HardLink { .. })));
        assert!(a.values().any(|e| matches!(e, Entry::Symlink { .. })));
        let mut x = vec![0u8; 3 * BLOCK];
        let mut y = vec![0u8; BLOCK];
        fill(9, 0, &mut x);
        fill(9, 2 * BLOCK as u64, &mut y);
        assert_eq!(x[2 * BLOCK..], y[..]);
        // Blocks differ from one another, and from another seed's.
        assert_ne!(x[..BLOCK], x[BLOCK..2 * BLOCK]);
        fill(10, 2 * BLOCK as u64, &mut y);
        assert_ne!(x[2 * BLOCK..], y[..]);
    }
}
