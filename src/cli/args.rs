//! The command-line definitions of the operator commands (clap), with
//! their help texts. `src/main.rs` flattens [`AdminCommand`] into its own
//! subcommands and [`ClientArgs`] into its global options.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::{ADDRESS_ENV, DEFAULT_ADDRESS, usage};
use crate::config::ByteSize;

/// Options every operator command takes, before or after its name.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    /// The daemon's socket [default: $COWSNAP_ADDRESS, else
    /// /run/cowsnap/cowsnap.sock].
    // The id `address` is also `serve`'s own option: clap then keeps
    // serve's definition (and its default from the config file) instead
    // of propagating this global one into it.
    #[arg(long, global = true, value_name = "PATH")]
    pub address: Option<PathBuf>,
    /// Operator commands: print one JSON document instead of text (stable
    /// field names, sizes in bytes, times in RFC 3339 UTC).
    #[arg(long, global = true)]
    pub json: bool,
}

/// What the commands need to reach the daemon and print.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The daemon's socket.
    pub address: PathBuf,
    /// JSON output.
    pub json: bool,
}

impl ClientOptions {
    /// `--address`, else `$COWSNAP_ADDRESS`, else [`DEFAULT_ADDRESS`].
    pub fn from_args(args: &ClientArgs) -> ClientOptions {
        let address = args
            .address
            .clone()
            .or_else(|| {
                std::env::var_os(ADDRESS_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS));
        ClientOptions {
            address,
            json: args.json,
        }
    }
}

/// The operator commands.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Show the daemon's version, backend, root, quota state and snapshot
    /// counts.
    Status,
    /// List snapshots with their ids, optionally filtered.
    #[command(
        visible_alias = "list",
        long_about = "List snapshots with their ids, in key order.\n\n\
            Filters use containerd's syntax (fields: name, parent, kind, labels.KEY; \
            operators ==, !=, ~= (regular expression), and a bare field for \"present\"); \
            a comma joins conditions (AND), several filters are OR-ed.",
        after_help = "Examples:\n  \
            cowsnap ls\n  \
            cowsnap ls kind==committed\n  \
            cowsnap ls 'labels.\"containerd.io/gc.root\"' --usage\n  \
            cowsnap ls 'parent==sha256:abc' 'name~=^ctr-' --quiet"
    )]
    Ls(LsArgs),
    /// Show everything about one snapshot: fields, labels, space, limit,
    /// object and children.
    #[command(after_help = "Examples:\n  \
        cowsnap inspect default/12/ctr\n  \
        cowsnap inspect 1042\n  \
        cowsnap inspect 104      (the snapshot whose id starts with 104, if only one does)")]
    Inspect(InspectArgs),
    /// Show snapshots as a forest of parents and children, with kind and
    /// exclusive size.
    #[command(
        long_about = "Show snapshots as a forest: each top-level snapshot (no parent) \
            followed by its descendants, children in id order, with kind and exclusive bytes."
    )]
    Tree(TreeArgs),
    /// Show who holds the space: per snapshot, per chain, per label value or
    /// per base layer, reconciled with the filesystem.
    #[command(long_about = USAGE_LONG_ABOUT, after_help = USAGE_AFTER_HELP)]
    Usage(UsageArgs),
    /// Check that metadata, filesystem objects and quota accounting agree;
    /// optionally repair.
    #[command(
        long_about = "Check that metadata, filesystem objects and quota accounting agree.\n\n\
            Finds objects no snapshot owns (orphan_object), snapshots whose object is gone \
            (missing_object), objects in the wrong state (wrong_state), quota accounting the \
            filesystem marks inconsistent (quota_inconsistent) and, with --repair, accounting \
            entries of deleted objects (stale_accounting).\n\n\
            --repair destroys orphans, puts objects in the state their record says, starts a \
            quota rescan when accounting is inconsistent and removes stale accounting. A \
            missing object is never repaired silently: remove that snapshot (containerd's \
            garbage collector does).\n\n\
            Exits 3 when findings remain unrepaired.",
        after_help = "Examples:\n  cowsnap check\n  cowsnap check --repair"
    )]
    Check(CheckArgs),
    /// Destroy filesystem objects no snapshot owns and stale accounting
    /// entries; report what was reclaimed.
    #[command(
        long_about = "Destroy filesystem objects no snapshot owns (left by a crash or a \
            failed removal) and accounting entries of deleted objects, and report how many \
            and how many bytes were reclaimed. Objects still busy (mounted) are left for the \
            next cleanup; then the command exits 3."
    )]
    Cleanup,
    /// Set or clear a snapshot's size limit.
    #[command(subcommand)]
    Quota(QuotaCommand),
}

/// `ls` options.
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// containerd filters (OR-ed), e.g. `kind==active`, `labels."x"==y`,
    /// `parent==base,name~=^ctr`.
    #[arg(value_name = "FILTER")]
    pub filters: Vec<String>,
    /// Also show exclusive and referenced bytes (one quota lookup per
    /// snapshot).
    #[arg(long, short = 'u')]
    pub usage: bool,
    /// Print keys only, one per line (ignored with --json).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print creation times in RFC 3339 instead of "5m ago".
    #[arg(long)]
    pub absolute_time: bool,
}

/// `inspect` options.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// A key or name, a numeric id, or a unique prefix (at least 3 digits)
    /// of an id. A prefix several ids start with is refused with the list
    /// of candidates.
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// `tree` options.
#[derive(Debug, Clone, Args)]
pub struct TreeArgs {
    /// Show only this snapshot and its descendants (key, id or id prefix).
    #[arg(value_name = "REF")]
    pub reference: Option<String>,
}

/// A snapshot kind on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Writable snapshots (containers' root filesystems, layers being
    /// unpacked).
    Active,
    /// Read-only views.
    View,
    /// Committed (image layers).
    Committed,
}

impl KindArg {
    /// The kind's name as the API and containerd write it.
    pub fn name(self) -> &'static str {
        match self {
            KindArg::Active => "active",
            KindArg::View => "view",
            KindArg::Committed => "committed",
        }
    }
}

const USAGE_LONG_ABOUT: &str = "\
Show who holds the space on the filesystem.

Columns (bytes from the filesystem's quota accounting, which btrfs updates at
each transaction commit, so figures of busy active snapshots lag by up to ~30 s):
  EXCLUSIVE   bytes only this snapshot holds: what removing this snapshot alone
              would free (a snapshot with children cannot be removed before them).
              Simple quotas: the bytes the snapshot wrote; full qgroups: the bytes
              no other subvolume refers to.
  REFERENCED  bytes the snapshot's tree refers to, its own and those it shares
              with its parent (simple quotas do not track sharing: there it equals
              EXCLUSIVE).
  CHAIN       EXCLUSIVE of the snapshot plus all its ancestors: the image-like
              total a container's or an image's root filesystem takes on disk.
              Chains that share a base layer each count it, so CHAIN figures of
              different rows overlap and do not add up. With full qgroups, data two
              members of the chain share is in neither's EXCLUSIVE, so CHAIN is a
              lower bound.
  LENGTH      (--by chain) snapshots in the chain.
  SNAPSHOTS   (groups) snapshots in the group; EXCLUSIVE is then their sum.

Groupings (--by):
  snapshot    one row per snapshot (default).
  chain       one row per chain: a snapshot nothing descends from (a container,
              a view, an unused top layer) with all its ancestors.
  label:KEY   one row per value of label KEY, summing EXCLUSIVE; snapshots
              without the label are in the \"(none)\" row.
  root        one row per top-level snapshot (a base layer) with everything
              above it, summing EXCLUSIVE.
Snapshot, label and root rows partition the snapshots: their EXCLUSIVE figures
add up to the accounted total.

The footer reconciles with the filesystem: Accounted is the sum of EXCLUSIVE
over all snapshots; Unaccounted is the filesystem's used bytes minus that
(filesystem metadata, the metadata database, other data on the filesystem,
space of deleted snapshots not yet freed, and with full qgroups data that
snapshots share); then the filesystem's used and total size and the quota
mode and whether the filesystem reports its accounting consistent.";

const USAGE_AFTER_HELP: &str = "Examples:
  cowsnap usage --top 10
  cowsnap usage --by chain --top 5
  cowsnap usage --by label:containerd.io/snapshot/cri.image-ref --sort count
  cowsnap usage --by root --json";

/// `usage` options.
#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    /// Rows: `snapshot`, `chain`, `label:KEY` or `root` (see above).
    #[arg(long, default_value = "snapshot", value_name = "GROUPING")]
    pub by: usage::GroupBy,
    /// Order of the rows [default: chain for --by chain, else exclusive].
    #[arg(long, value_enum)]
    pub sort: Option<usage::SortKey>,
    /// Show only the first N rows.
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,
    /// Count only snapshots of this kind as rows or group members (chain
    /// sums still include every ancestor).
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,
}

/// `check` options.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Repair what can be repaired (destroy orphans, fix object states,
    /// rescan quota accounting, remove stale accounting).
    #[arg(long)]
    pub repair: bool,
}

/// `quota` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum QuotaCommand {
    /// Limit how many bytes a snapshot may hold; writes beyond it fail with
    /// "disk quota exceeded".
    #[command(
        after_help = "Examples:\n  cowsnap quota set default/12/ctr 10G\n  cowsnap quota set 1042 512MiB"
    )]
    Set(QuotaSetArgs),
    /// Remove a snapshot's size limit.
    Clear(QuotaClearArgs),
}

/// `quota set` arguments.
#[derive(Debug, Clone, Args)]
pub struct QuotaSetArgs {
    /// A key or name, a numeric id, or a unique id prefix.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// The limit: a number of bytes or a size with a binary unit (K, M, G,
    /// T; `10G`, `512MiB`).
    #[arg(value_name = "SIZE", value_parser = parse_limit)]
    pub size: u64,
}

/// `quota clear` arguments.
#[derive(Debug, Clone, Args)]
pub struct QuotaClearArgs {
    /// A key or name, a numeric id, or a unique id prefix.
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// A size limit from the command line; zero is refused (it would read as
/// "no space at all" but the API takes it as "no limit").
fn parse_limit(s: &str) -> Result<u64, String> {
    match s.parse::<ByteSize>() {
        Ok(ByteSize(0)) => {
            Err("a limit must be more than 0 (to remove one: cowsnap quota clear REF)".into())
        }
        Ok(b) => Ok(b.bytes()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_with_binary_units_and_refuse_zero() {
        assert_eq!(parse_limit("10G"), Ok(10 << 30));
        assert_eq!(parse_limit("512MiB"), Ok(512 << 20));
        assert_eq!(parse_limit("4096"), Ok(4096));
        assert!(parse_limit("0").unwrap_err().contains("quota clear"));
        assert!(parse_limit("lots").unwrap_err().contains("invalid size"));
    }
}
