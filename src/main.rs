//! The `cowsnap` command: the daemon and (later) its tools. A thin adapter
//! over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use cowsnap::config::Config;

/// A copy-on-write snapshotter for containerd on btrfs.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the snapshotter daemon in the foreground (containerd proxy plugin).
    Serve {
        /// Directory holding the snapshots and the metadata
        /// [default: /var/lib/cowsnap, or `root` in the config file].
        #[arg(long)]
        root: Option<PathBuf>,
        /// Unix socket to serve on
        /// [default: /run/cowsnap/cowsnap.sock, or `address` in the config file].
        #[arg(long)]
        address: Option<PathBuf>,
        /// Configuration file [default: /etc/cowsnap/config.toml if it exists].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print an example configuration file documenting every option.
    ExampleConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            root,
            address,
            config,
        } => {
            let (mut cfg, file) = match Config::load_default_or_given(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cowsnap: {e}");
                    return ExitCode::from(2);
                }
            };
            cfg.apply_overrides(root, address);
            init_logging(cfg.log_level.as_deref());
            if let Some(f) = file {
                tracing::info!(config = %f.display(), "read configuration");
            }
            match cowsnap::daemon::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("cowsnap: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ExampleConfig => {
            print!("{}", Config::example_toml());
            ExitCode::SUCCESS
        }
    }
}

/// Logs to stderr; RUST_LOG wins over the configured level.
fn init_logging(level: Option<&str>) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(level.unwrap_or("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
