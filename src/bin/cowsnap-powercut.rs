//! `cowsnap-powercut`: the guest side of the power-cut test (hack/power-cut).
//! `load` unpacks layers through a snapshots socket and announces each
//! acknowledged Commit on stdout (the serial console) until the host cuts
//! the power; `check`, after the next boot, compares what the snapshotter
//! kept with the acknowledgements. See `cowsnap::bench::powercut`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use cowsnap::bench::powercut::{self, CheckOptions, LINE_PREFIX, LoadOptions};
use cowsnap::bench::target::Target;

/// Power-cut workload and checker for a snapshots socket.
#[derive(Parser)]
#[command(about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Unpack layers until killed, printing `COWSNAP-PC ACK <name>` as
    /// each Commit is acknowledged.
    Load {
        #[command(flatten)]
        target: TargetArgs,
        /// This boot's number: names the layers it writes.
        #[arg(long)]
        run: u32,
        /// Concurrent layer writers.
        #[arg(long, default_value_t = 3)]
        writers: u32,
        /// Concurrent containers writing to active snapshots.
        #[arg(long, default_value_t = 1)]
        containers: u32,
        /// Small and medium files per layer.
        #[arg(long, default_value_t = 2000)]
        files: u32,
        /// Large files per layer.
        #[arg(long, default_value_t = 1)]
        large: u32,
        /// Size of each large file, MiB.
        #[arg(long, default_value_t = 8)]
        large_mib: u32,
        /// Stop after this many seconds instead of running until killed.
        #[arg(long)]
        duration_s: Option<u64>,
        /// Directory for mount points.
        #[arg(long, default_value = "/tmp/cowsnap-powercut")]
        work_dir: PathBuf,
    },
    /// Compare the committed layers with the acknowledgements; print
    /// `COWSNAP-PC RESULT <json>`; exit 1 if an acknowledged Commit was
    /// lost or a kept one is torn.
    Check {
        #[command(flatten)]
        target: TargetArgs,
        /// File of acknowledged names, one per line.
        #[arg(long)]
        acked: PathBuf,
        /// Compare byte for byte the layers of this run and later ones
        /// (older ones are only checked to exist).
        #[arg(long, default_value_t = 0)]
        full_from_run: u32,
        /// Afterwards, remove the layers of runs before this one.
        #[arg(long, default_value_t = 0)]
        prune_before_run: u32,
        /// Layers of runs before this one were removed by an earlier
        /// check: do not look for their acknowledgements.
        #[arg(long, default_value_t = 0)]
        pruned_before_run: u32,
        /// Directory for mount points.
        #[arg(long, default_value = "/tmp/cowsnap-powercut")]
        work_dir: PathBuf,
    },
}

#[derive(Args)]
struct TargetArgs {
    /// The snapshots socket (cowsnap's, or containerd's).
    #[arg(long)]
    socket: PathBuf,
    /// Snapshotter name sent in every request.
    #[arg(long, default_value = "cowsnap")]
    snapshotter: String,
    /// containerd namespace; needed for containerd's socket.
    #[arg(long)]
    namespace: Option<String>,
}

impl TargetArgs {
    fn target(self) -> Target {
        Target {
            socket: self.socket,
            snapshotter: self.snapshotter,
            namespace: self.namespace,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cowsnap-powercut: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            println!("{LINE_PREFIX} ERROR {e}");
            eprintln!("cowsnap-powercut: {e}");
            ExitCode::from(3)
        }
    }
}

async fn run(cmd: Command) -> Result<ExitCode, String> {
    match cmd {
        Command::Load {
            target,
            run,
            writers,
            containers,
            files,
            large,
            large_mib,
            duration_s,
            work_dir,
        } => {
            let opts = LoadOptions {
                run,
                writers,
                containers,
                files,
                large,
                large_mib,
                work_dir,
                duration: duration_s.map(Duration::from_secs),
                started: Instant::now(),
            };
            powercut::load(&target.target(), &opts).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            target,
            acked,
            full_from_run,
            prune_before_run,
            pruned_before_run,
            work_dir,
        } => {
            let text = std::fs::read_to_string(&acked)
                .map_err(|e| format!("reading {}: {e}", acked.display()))?;
            let acked: BTreeSet<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            let opts = CheckOptions {
                acked,
                full_from_run,
                prune_before_run,
                pruned_before_run,
                work_dir,
            };
            let report = powercut::check(&target.target(), &opts).await?;
            let json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
            println!("{LINE_PREFIX} RESULT {json}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
