//! The operator commands of `cowsnap` (`status`, `ls`, `inspect`, `tree`,
//! `usage`, `check`, `cleanup`, `quota`): a thin adapter over the daemon's
//! admin API (`cowsnap.admin.v1`, src/admin.rs). They talk to the daemon
//! on its socket only and never open the metadata database themselves, so
//! they are safe to run while the daemon serves containerd.
//!
//! Each command is one or two admin calls followed by a pure function from
//! the answer to text or to a JSON document (the submodules, unit-tested
//! without a daemon). The clap definitions are in [`args`]; `src/main.rs`
//! flattens [`AdminCommand`] into its own subcommands.
//!
//! Exit status: 0 success; 1 the daemon could not be reached or refused the
//! request (its message on stderr); 3 `check` (or `cleanup`) left
//! something unrepaired.

pub mod args;
pub mod format;
pub mod report;
pub mod snapshot;
pub mod table;
pub mod tree;
pub mod usage;

use std::io::Write as _;
use std::process::ExitCode;

use serde::Serialize;
use tonic::transport::Channel;

use crate::proto::cowsnap::admin::v1 as pb;
use crate::proto::cowsnap::admin::v1::admin_client::AdminClient;
pub use args::{
    AdminCommand, CheckArgs, ClientArgs, ClientOptions, InspectArgs, KindArg, LsArgs,
    QuotaClearArgs, QuotaCommand, QuotaSetArgs, TreeArgs, UsageArgs,
};
use format::{filter_quote, human_bytes, now_secs, printable};
use snapshot::{SnapshotDoc, TimeStyle};

/// The daemon's socket when neither `--address` nor `COWSNAP_ADDRESS` says
/// otherwise (the daemon's own default).
pub const DEFAULT_ADDRESS: &str = "/run/cowsnap/cowsnap.sock";

/// Environment variable naming the daemon's socket.
pub const ADDRESS_ENV: &str = "COWSNAP_ADDRESS";

/// Exit status when the daemon could not be reached or refused.
pub const EXIT_ERROR: u8 = 1;

/// Exit status of `check` (and `cleanup`) when something is left
/// unrepaired.
pub const EXIT_INCONSISTENT: u8 = 3;

/// Largest answer accepted from the daemon (the usage report of tens of
/// thousands of labelled snapshots is tens of MiB).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The socket could not be dialled.
    #[error(
        "cannot connect to the cowsnap daemon at {address}: {detail} \
         (is it running? choose its socket with --address or {ADDRESS_ENV})"
    )]
    Connect {
        /// The socket.
        address: String,
        /// The error and its causes.
        detail: String,
    },
    /// The daemon answered with an error.
    #[error("{}", status_message(.0))]
    Status(#[from] tonic::Status),
    /// Output could not be encoded.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn status_message(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("the daemon answered {:?}", s.code())
    } else {
        s.message().to_owned()
    }
}

/// An error with its chain of causes, `: `-joined.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// What a command prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Standard output.
    pub stdout: String,
    /// Exit status.
    pub exit: u8,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome { stdout, exit: 0 }
    }
}

/// Runs `command` against the daemon: prints its output or, on failure,
/// the reason on stderr; returns the exit status.
pub fn run(options: &ClientOptions, command: AdminCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cowsnap: starting the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(execute(options, command)) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`cowsnap ls | head`) is not an error.
            match stdout
                .write_all(out.stdout.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("cowsnap: writing the output: {e}");
                    ExitCode::from(EXIT_ERROR)
                }
                _ => ExitCode::from(out.exit),
            }
        }
        Err(e) => {
            eprintln!("cowsnap: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Connects to the admin service on the daemon's socket.
pub async fn connect(options: &ClientOptions) -> Result<AdminClient<Channel>, CliError> {
    let channel = crate::client::connect_channel(&options.address)
        .await
        .map_err(|e| CliError::Connect {
            address: options.address.display().to_string(),
            detail: with_causes(&e),
        })?;
    Ok(AdminClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

fn json<T: Serialize>(doc: &T) -> Result<String, CliError> {
    let mut text = serde_json::to_string_pretty(doc)?;
    text.push('\n');
    Ok(text)
}

/// Runs `command` and returns what to print.
pub async fn execute(options: &ClientOptions, command: AdminCommand) -> Result<Outcome, CliError> {
    let mut client = connect(options).await?;
    let c = &mut client;
    let as_json = options.json;
    match command {
        AdminCommand::Status => {
            let st = c.status(pb::StatusRequest {}).await?.into_inner();
            let address = options.address.display().to_string();
            Ok(Outcome::ok(if as_json {
                json(&report::StatusDoc::from_pb(&st, &address))?
            } else {
                report::status_text(&st, &address, now_secs())
            }))
        }
        AdminCommand::Ls(args) => {
            let snapshots = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    filters: args.filters,
                    with_usage: args.usage,
                })
                .await?
                .into_inner()
                .snapshots;
            Ok(Outcome::ok(if as_json {
                #[derive(Serialize)]
                struct Doc {
                    snapshots: Vec<SnapshotDoc>,
                }
                json(&Doc {
                    snapshots: snapshots.iter().map(SnapshotDoc::from_pb).collect(),
                })?
            } else if args.quiet {
                snapshot::ls_keys(&snapshots)
            } else {
                let time = if args.absolute_time {
                    TimeStyle::Absolute
                } else {
                    TimeStyle::Relative(now_secs())
                };
                snapshot::ls_table(&snapshots, args.usage, time)
            }))
        }
        AdminCommand::Inspect(args) => {
            let s = inspect(c, &args.reference).await?;
            let child_keys = if s.children > 0 {
                let filter = format!("parent=={}", filter_quote(&s.key));
                c.list_snapshots(pb::ListSnapshotsRequest {
                    filters: vec![filter],
                    with_usage: false,
                })
                .await?
                .into_inner()
                .snapshots
                .into_iter()
                .map(|s| s.key)
                .collect()
            } else {
                Vec::new()
            };
            Ok(Outcome::ok(if as_json {
                let mut doc = SnapshotDoc::from_pb(&s);
                doc.child_keys = Some(child_keys);
                json(&doc)?
            } else {
                snapshot::inspect_text(&s, &child_keys, now_secs())
            }))
        }
        AdminCommand::Tree(args) => {
            let top = match &args.reference {
                Some(r) => Some(inspect(c, r).await?.id),
                None => None,
            };
            let all = c.usage(pb::UsageRequest {}).await?.into_inner().snapshots;
            let nodes = tree::forest(&all, top);
            Ok(Outcome::ok(if as_json {
                #[derive(Serialize)]
                struct Doc {
                    nodes: Vec<tree::TreeNode>,
                }
                json(&Doc { nodes })?
            } else {
                tree::render(&nodes)
            }))
        }
        AdminCommand::Usage(args) => {
            let answer = c.usage(pb::UsageRequest {}).await?.into_inner();
            let fs = answer.filesystem.unwrap_or_default();
            let query = usage::UsageQuery {
                by: args.by,
                sort: args.sort,
                top: args.top,
                kind: args.kind.map(KindArg::name),
            };
            let table = usage::compute(&answer.snapshots, &query);
            let n = answer.snapshots.len();
            Ok(Outcome::ok(if as_json {
                json(&usage::to_doc(&table, n, &fs))?
            } else {
                usage::render(&table, n, &fs)
            }))
        }
        AdminCommand::Check(args) => {
            let answer = c
                .check(pb::CheckRequest {
                    repair: args.repair,
                })
                .await?
                .into_inner();
            Ok(Outcome {
                stdout: if as_json {
                    json(&report::CheckDoc::from_pb(&answer, args.repair))?
                } else {
                    report::check_text(&answer, args.repair)
                },
                exit: if answer.consistent {
                    0
                } else {
                    EXIT_INCONSISTENT
                },
            })
        }
        AdminCommand::Cleanup => {
            let answer = c.cleanup(pb::CleanupRequest {}).await?.into_inner();
            Ok(Outcome {
                stdout: if as_json {
                    json(&report::CleanupDoc::from_pb(&answer))?
                } else {
                    report::cleanup_text(&answer)
                },
                exit: if answer.orphans_failed == 0 {
                    0
                } else {
                    EXIT_INCONSISTENT
                },
            })
        }
        AdminCommand::Quota(q) => {
            let (reference, limit_bytes) = match q {
                QuotaCommand::Set(a) => (a.reference, a.size),
                QuotaCommand::Clear(a) => (a.reference, 0),
            };
            let s = c
                .set_quota(pb::SetQuotaRequest {
                    r#ref: reference,
                    limit_bytes,
                })
                .await?
                .into_inner();
            Ok(Outcome::ok(if as_json {
                json(&SnapshotDoc::from_pb(&s))?
            } else {
                quota_text(&s)
            }))
        }
    }
}

async fn inspect(c: &mut AdminClient<Channel>, reference: &str) -> Result<pb::Snapshot, CliError> {
    Ok(c.inspect(pb::InspectRequest {
        r#ref: reference.to_owned(),
    })
    .await?
    .into_inner())
}

/// What `quota set` / `quota clear` print.
fn quota_text(s: &pb::Snapshot) -> String {
    let limit = if s.limit_bytes == 0 {
        "none".to_owned()
    } else {
        format!("{} ({} bytes)", human_bytes(s.limit_bytes), s.limit_bytes)
    };
    format!("Limit of {} (id {}): {limit}\n", printable(&s.key), s.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_address_comes_from_the_flag_then_the_default() {
        let flag = ClientOptions::from_args(&ClientArgs {
            address: Some("/x.sock".into()),
            json: true,
        });
        assert_eq!(flag.address, PathBuf::from("/x.sock"));
        assert!(flag.json);
        // The environment is process-wide: only check the fallback when the
        // variable is not set by whoever runs the tests.
        if std::env::var_os(ADDRESS_ENV).is_none() {
            let default = ClientOptions::from_args(&ClientArgs::default());
            assert_eq!(default.address, PathBuf::from(DEFAULT_ADDRESS));
        }
    }

    #[test]
    fn quota_text_names_the_snapshot_and_the_limit() {
        let mut s = pb::Snapshot {
            id: 4,
            key: "ctr".into(),
            limit_bytes: 2 << 20,
            ..Default::default()
        };
        assert_eq!(
            quota_text(&s),
            "Limit of ctr (id 4): 2.0 MiB (2097152 bytes)\n"
        );
        s.limit_bytes = 0;
        assert_eq!(quota_text(&s), "Limit of ctr (id 4): none\n");
    }

    #[test]
    fn errors_carry_the_daemons_message() {
        let e = CliError::from(tonic::Status::invalid_argument(
            "admin.inspect: id prefix 100 is ambiguous: 1001 (a), 1002 (b)",
        ));
        assert_eq!(
            e.to_string(),
            "admin.inspect: id prefix 100 is ambiguous: 1001 (a), 1002 (b)"
        );
        let empty = CliError::from(tonic::Status::unavailable(""));
        assert_eq!(empty.to_string(), "the daemon answered Unavailable");
    }
}
