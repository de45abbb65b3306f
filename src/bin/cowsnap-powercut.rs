//! `cowsnap-powercut`: the guest side of the power-cut test (hack/power-cut).
//! `load` unpacks layers through a snapshots socket and announces each
//! acknowledged Commit on stdout (the serial console) until the host cuts
//! the power; `check`, after the next boot, compares what the snapshotter
//! kept with the acknowledgements. See `cowsnap::bench::powercut`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        target: Target,
        #[command(flatten)]
        opts: LoadOptions,
    },
    /// Compare the committed layers with the acknowledgements; print
    /// `COWSNAP-PC RESULT <json>`; exit 1 if an acknowledged Commit was
    /// lost or a kept one is torn.
    Check {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        opts: CheckOptions,
    },
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
        Command::Load { target, opts } => {
            powercut::load(&target, &opts).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { target, opts } => {
            let report = powercut::check(&target, &opts).await?;
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
