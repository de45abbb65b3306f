//! Export and import of committed snapshots as portable archives
//! (docs/transfer.md has the format and the guarantees).
//!
//! Both run in the daemon (the command-line tools never open the metadata
//! while it serves) and go through the core's lifecycle:
//!
//! - **Export** ([`export`]) resolves a committed snapshot, takes a read-only
//!   view of it (and of each ancestor with `--chain`) under the reserved key
//!   prefix [`EXPORT_NAMESPACE`], writes the archive from the views' trees
//!   and removes the views, also on error or when the client goes away.
//!   With the btrfs-send format it pins the snapshot with one view and
//!   sends the committed subvolumes themselves (their UUIDs must be stable
//!   for incremental streams).
//! - **Import** ([`import`]) reads the metadata entry, refuses existing names
//!   before writing anything, then per layer prepares an active snapshot
//!   under [`IMPORT_NAMESPACE`] (on the previous layer), unpacks into it and
//!   commits it under its name; a btrfs-send layer is received into a
//!   staging directory and adopted by the core instead. Any failure removes
//!   everything this import created.
//!
//! [`server`] adapts both to the admin API's streams; [`client`] is the
//! command line's side, with [`progress`] bars on a terminal.

pub mod archive;
pub mod client;
mod entry;
mod export;
mod import;
mod native;
mod pack;
pub mod progress;
pub mod server;
mod tree;
mod unpack;

use std::sync::atomic::{AtomicU64, Ordering};

pub use archive::Compression;
pub use export::{Export, ExportOptions, begin_export, export};
pub use import::import;

use crate::snapshotter::Snapshotter;

/// Key prefix of the views an export holds while it runs.
pub const EXPORT_NAMESPACE: &str = "cowsnap.export/";
/// Key prefix of the active snapshots an import fills before committing.
pub const IMPORT_NAMESPACE: &str = "cowsnap.import/";

/// What an archive carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Tar entries of the files (portable: any backend, any filesystem).
    #[default]
    Tar,
    /// `btrfs send` streams (btrfs on both sides; fastest).
    BtrfsSend,
}

impl Format {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::BtrfsSend => "btrfs-send",
        }
    }
}

/// A tag unique within this daemon's life and distinct from every earlier
/// instance's (they start with the instance's start time), for temporary
/// keys and staging directories.
fn unique_tag(core: &Snapshotter) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", instance_tag(core))
}

/// Removes the temporary snapshots (export views, import snapshots) that
/// an earlier daemon instance left behind: it crashed or was stopped in the
/// middle of a transfer. Those of this instance belong to transfers still
/// running.
fn sweep_leftovers(core: &Snapshotter) {
    let current = instance_tag(core);
    let records = match core.meta.all() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not list snapshots to sweep transfer leftovers");
            return;
        }
    };
    for (key, _) in records {
        let Some(tag) = key
            .strip_prefix(EXPORT_NAMESPACE)
            .or_else(|| key.strip_prefix(IMPORT_NAMESPACE))
        else {
            continue;
        };
        if tag.starts_with(&current) {
            continue;
        }
        tracing::warn!(key = %key, "removing a snapshot an interrupted export or import left behind");
        if let Err(e) = core.remove(&key) {
            tracing::warn!(key = %key, error = %e, "could not remove a transfer leftover");
        }
    }
}

/// This daemon instance's prefix of [`unique_tag`].
fn instance_tag(core: &Snapshotter) -> String {
    let t = core.started();
    format!("{}.{:09}", t.secs, t.nanos)
}
