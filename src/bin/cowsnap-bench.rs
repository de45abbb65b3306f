//! `cowsnap-bench`: drives a snapshots socket with the benchmark's
//! workloads and prints one JSON line per figure on stdout (progress and a
//! summary on stderr); `report` turns the lines of several runs into the
//! side-by-side table. hack/bench runs it against cowsnap and containerd's
//! snapshotters on one filesystem; docs/performance.md has the results.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use cowsnap::bench::record::{Better, Emitter, fmt_value};
use cowsnap::bench::report::{self, Labels};
use cowsnap::bench::target::Target;
use cowsnap::bench::workloads::{self, Bench, Scale, WORKLOADS};

/// Benchmark of snapshotters through containerd's snapshots API.
#[derive(Parser)]
#[command(about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run workloads against one target.
    Run {
        #[command(flatten)]
        target: TargetArgs,
        /// Workloads: `all` or a comma-separated list of cycles, chain,
        /// usage, list, concurrent, commits.
        #[arg(long, default_value = "all")]
        workload: String,
        /// `full` (the counts) or `smoke` (every path once).
        #[arg(long, value_enum, default_value_t = ScaleArg::Full)]
        scale: ScaleArg,
        /// Directory for mount points.
        #[arg(long, default_value = "/tmp/cowsnap-bench")]
        work_dir: PathBuf,
        /// A path on the snapshots' filesystem, synced between workloads.
        #[arg(long)]
        settle_path: Option<PathBuf>,
        /// The snapshots' btrfs in sysfs (`/sys/fs/btrfs/<uuid>`): count
        /// its transaction commits per workload.
        #[arg(long)]
        btrfs_sysfs: Option<PathBuf>,
    },
    /// Create empty snapshots (for memory and startup measurements).
    Populate {
        #[command(flatten)]
        target: TargetArgs,
        /// How many.
        #[arg(long)]
        count: usize,
        /// Concurrent connections.
        #[arg(long, default_value_t = 8)]
        workers: usize,
    },
    /// Record a process's resident memory (VmRSS, MiB).
    Rss {
        /// The process.
        #[arg(long)]
        pid: u32,
        /// Who is measured.
        #[arg(long)]
        label: String,
        /// The figure's name (workload `memory`).
        #[arg(long)]
        metric: String,
    },
    /// Wait until a socket answers List; record the time since a start.
    WaitList {
        #[command(flatten)]
        target: TargetArgs,
        /// When the daemon was started (`date +%s%N`).
        #[arg(long)]
        since_ns: u128,
        /// Wait until List returns at least this many snapshots.
        #[arg(long, default_value_t = 0)]
        expect: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        /// The figure's name (workload `startup`).
        #[arg(long)]
        metric: String,
    },
    /// Record a figure measured elsewhere (e.g. by hack/bench around ctr).
    Record {
        /// Who is measured.
        #[arg(long)]
        label: String,
        /// The workload.
        #[arg(long)]
        workload: String,
        /// The figure.
        #[arg(long)]
        metric: String,
        /// Its value.
        #[arg(long)]
        value: f64,
        /// Its unit.
        #[arg(long)]
        unit: String,
        /// Which direction is better.
        #[arg(long, value_enum, default_value_t = BetterArg::Lower)]
        better: BetterArg,
        /// Samples summarized.
        #[arg(long, default_value_t = 1)]
        samples: usize,
    },
    /// Print the side-by-side table of JSON-lines files, with ratios and
    /// the targets.
    Report {
        /// Files of JSON lines (other lines are skipped).
        files: Vec<PathBuf>,
        /// Markdown instead of aligned text.
        #[arg(long)]
        markdown: bool,
    },
}

#[derive(Args)]
struct TargetArgs {
    #[command(flatten)]
    target: Target,
    /// Name of this target in the results [default: the snapshotter name,
    /// prefixed with `ctrd/` when a namespace is given].
    #[arg(long)]
    label: Option<String>,
}

impl TargetArgs {
    fn split(self) -> (Target, String) {
        let label = self.label.unwrap_or_else(|| self.target.default_label());
        (self.target, label)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ScaleArg {
    Full,
    Smoke,
}

#[derive(Clone, Copy, ValueEnum)]
enum BetterArg {
    Lower,
    Higher,
    None,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cowsnap-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cowsnap-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> Result<(), String> {
    match cmd {
        Command::Run {
            target,
            workload,
            scale,
            work_dir,
            settle_path,
            btrfs_sysfs,
        } => {
            let (target, label) = target.split();
            let scale = match scale {
                ScaleArg::Full => Scale::full(),
                ScaleArg::Smoke => Scale::smoke(),
            };
            let names: Vec<&str> = if workload == "all" {
                WORKLOADS.to_vec()
            } else {
                workload.split(',').map(str::trim).collect()
            };
            std::fs::create_dir_all(&work_dir)
                .map_err(|e| format!("creating {}: {e}", work_dir.display()))?;
            let mut bench = Bench::new(target, &label, scale, work_dir, settle_path)
                .count_btrfs_commits(btrfs_sysfs);
            let mut result = Ok(());
            for name in names {
                if let Err(e) = bench.workload(name).await {
                    result = Err(e);
                    break;
                }
            }
            eprintln!("\n{label}:");
            for r in bench.emitter().records() {
                eprintln!(
                    "  {:<11} {:<28} {:>12} {}",
                    r.workload,
                    r.metric,
                    fmt_value(r.value),
                    r.unit
                );
            }
            result
        }
        Command::Populate {
            target,
            count,
            workers,
        } => {
            let (target, label) = target.split();
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let prefix = format!("populate-{}-{nanos}", std::process::id());
            let took = workloads::populate(&target, &prefix, count, workers).await?;
            let mut out = Emitter::new(&label);
            out.emit(
                "memory",
                &format!("populate-{count}.rate"),
                count as f64 / took.as_secs_f64(),
                "snapshots/s",
                Better::Higher,
                count,
            );
            Ok(())
        }
        Command::Rss { pid, label, metric } => {
            let mib = cowsnap::bench::rss_mib(pid)?;
            Emitter::new(&label).emit("memory", &metric, mib, "MiB", Better::Lower, 1);
            Ok(())
        }
        Command::WaitList {
            target,
            since_ns,
            expect,
            timeout_s,
            metric,
        } => {
            let (target, label) = target.split();
            let (took, n) = cowsnap::bench::wait_list(
                &target,
                since_ns,
                expect,
                Duration::from_secs(timeout_s),
            )
            .await?;
            eprintln!("bench: {label} listed {n} snapshots");
            Emitter::new(&label).emit(
                "startup",
                &metric,
                took.as_secs_f64(),
                "s",
                Better::Lower,
                1,
            );
            Ok(())
        }
        Command::Record {
            label,
            workload,
            metric,
            value,
            unit,
            better,
            samples,
        } => {
            let better = match better {
                BetterArg::Lower => Better::Lower,
                BetterArg::Higher => Better::Higher,
                BetterArg::None => Better::None,
            };
            Emitter::new(&label).emit(&workload, &metric, value, &unit, better, samples);
            Ok(())
        }
        Command::Report { files, markdown } => {
            let mut records = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| format!("reading {}: {e}", f.display()))?;
                records.extend(report::parse(&text));
            }
            if records.is_empty() {
                return Err("no records in the given files".into());
            }
            print!("{}", report::render(&records, &Labels::default(), markdown));
            Ok(())
        }
    }
}
