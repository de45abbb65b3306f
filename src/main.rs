//! The `cowsnap` command: the daemon and the operator tools. A thin adapter
//! over the library (the tools are in `cowsnap::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use cowsnap::cli::{AdminCommand, ClientArgs, ClientOptions};
use cowsnap::config::Config;

/// A copy-on-write snapshotter for containerd on btrfs.
#[derive(Parser)]
#[command(
    version,
    about,
    long_about = "A copy-on-write snapshotter for containerd on btrfs.\n\n\
        `cowsnap serve` runs the daemon; the other commands talk to a running daemon \
        over its socket (--address) and print tables, or one JSON document with --json.",
    after_help = "Exit status: 0 success; 1 the daemon could not be reached or refused \
        (its message on stderr); 2 bad usage or configuration; 3 `check`/`cleanup` left \
        something unrepaired."
)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
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
    #[command(flatten)]
    Admin(AdminCommand),
    /// Write a committed snapshot (optionally with its ancestors) to a
    /// portable archive.
    #[command(
        long_about = "Write a committed snapshot to a portable archive: a zstd- or \
            gzip-compressed tar holding the snapshot's files (or, with --format btrfs-send, \
            btrfs send streams) and its name, labels and parent. `cowsnap import` recreates \
            it on any cowsnap daemon. Shows a progress bar when stderr is a terminal.",
        after_help = "Examples:\n  \
            cowsnap export sha256:abc -o layer.tar.zst\n  \
            cowsnap export top --chain -o image.tar.zst\n  \
            cowsnap export app --format btrfs-send -o app.cowsnap\n  \
            cowsnap export app-v2 --format btrfs-send --incremental -o app-v2.cowsnap\n  \
            cowsnap export base -o - | ssh host cowsnap import -"
    )]
    Export(cowsnap::transfer::client::ExportArgs),
    /// Recreate the snapshots of an archive written by `cowsnap export` as
    /// committed snapshots.
    #[command(
        long_about = "Recreate the snapshots of an archive written by `cowsnap export` as \
            committed snapshots, and print the name of the imported one. An existing name \
            is refused before anything is written; on any failure nothing is left behind.",
        after_help = "Examples:\n  \
            cowsnap import layer.tar.zst\n  \
            cowsnap import layer.tar.zst --key restored/base"
    )]
    Import(cowsnap::transfer::client::ImportArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:\n  \
        cowsnap completions bash > /etc/bash_completion.d/cowsnap\n  \
        cowsnap completions zsh > \"${fpath[1]}/_cowsnap\"\n  \
        cowsnap completions fish > ~/.config/fish/completions/cowsnap.fish")]
    Completions(CompletionsArgs),
}

/// `completions` arguments.
#[derive(Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
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
        Command::Admin(command) => {
            cowsnap::cli::run(&ClientOptions::from_args(&cli.client), command)
        }
        Command::Export(args) => {
            cowsnap::transfer::client::run_export(&ClientOptions::from_args(&cli.client), args)
        }
        Command::Import(args) => {
            cowsnap::transfer::client::run_import(&ClientOptions::from_args(&cli.client), args)
        }
        Command::Completions(args) => {
            clap_complete::generate(
                args.shell,
                &mut Cli::command(),
                "cowsnap",
                &mut std::io::stdout(),
            );
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
        // A log on a full disk must not take the daemon down: a failed log
        // write is dropped instead of reported with eprintln! (which panics
        // when stderr itself cannot be written).
        .log_internal_errors(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        // clap's own checks (unique names, valid defaults, ...), which
        // otherwise only run when a command is parsed in a debug build.
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_keeps_its_own_address_option() {
        let cli = Cli::try_parse_from(["cowsnap", "serve", "--address", "/x.sock"]).unwrap();
        match cli.command {
            Command::Serve { address, .. } => assert_eq!(address, Some("/x.sock".into())),
            _ => panic!("not serve"),
        }
        // Without the option, serve leaves the choice to the config file
        // (the operator commands' default must not leak into it).
        let cli = Cli::try_parse_from(["cowsnap", "serve"]).unwrap();
        match cli.command {
            Command::Serve { address, .. } => assert_eq!(address, None),
            _ => panic!("not serve"),
        }
    }

    #[test]
    fn operator_options_go_before_or_after_the_command() {
        for args in [
            &["cowsnap", "--json", "--address", "/a", "ls", "-q"][..],
            &["cowsnap", "ls", "-q", "--json", "--address", "/a"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(cli.client.json, "{args:?}");
            assert_eq!(cli.client.address, Some("/a".into()), "{args:?}");
            assert!(matches!(cli.command, Command::Admin(AdminCommand::Ls(_))));
        }
    }
}
