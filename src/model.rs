//! The snapshot model shared by the metadata store, the core and the
//! adapters: ids, kinds, snapshot information, usage and mounts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// cowsnap's own number for a snapshot. It names the snapshot's filesystem
/// object (a decimal path component or dataset name), so a client's key is
/// never used on disk. Ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(pub u64);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Kind of a snapshot, as containerd defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only snapshot of a committed parent; cannot be committed.
    View,
    /// Writable snapshot; becomes committed by Commit.
    Active,
    /// Immutable snapshot that can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Labels of a snapshot (ordered so output is stable).
pub type Labels = BTreeMap<String, String>;

/// containerd's limit on one label: key and value together, in bytes.
pub const MAX_LABEL_SIZE: usize = 4096;
/// cowsnap's limit on a key or name, in bytes. containerd's own keys are a
/// namespace, a transaction id and a digest: far below this.
pub const MAX_KEY_SIZE: usize = 4096;
/// cowsnap's limit on the number of labels on one snapshot.
pub const MAX_LABELS: usize = 1024;

/// Checks labels as containerd does (key + value at most 4096 bytes), plus
/// cowsnap's cap on their number.
pub fn validate_labels(labels: &Labels) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "too many labels: {} (at most {MAX_LABELS})",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument("label key must not be empty".into()));
        }
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {}",
                truncate_for_message(k)
            )));
        }
    }
    Ok(())
}

/// Checks a snapshot key or name given by a client.
pub fn validate_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} must not be empty")));
    }
    if key.len() > MAX_KEY_SIZE {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long, more than the maximum of {MAX_KEY_SIZE}",
            key.len()
        )));
    }
    Ok(())
}

/// Shortens client strings quoted in error messages and logs.
pub fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 128;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &s[..end], s.len())
}

/// A point in time stored in metadata (seconds and nanoseconds since the
/// Unix epoch), convertible to protobuf's Timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds since the Unix epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Timestamp { secs, nanos }
            }
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        if t.secs >= 0 {
            UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
                + Duration::from_nanos(t.nanos as u64)
        }
    }
}

/// What containerd's Stat and List return for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The parent's name; empty for a snapshot without a parent.
    pub parent: String,
    /// The kind.
    pub kind: Kind,
    /// Labels.
    pub labels: Labels,
    /// When the snapshot was created (for a committed one: committed).
    pub created: Timestamp,
    /// When the snapshot was last changed.
    pub updated: Timestamp,
}

/// Disk usage of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes the snapshot holds beyond its parent (see docs/design.md for
    /// exactly which bytes, per quota mode).
    pub size: u64,
    /// Inodes the snapshot created beyond its parent.
    pub inodes: u64,
}

/// One mount a client performs to use a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Filesystem type for mount(2), e.g. "bind".
    pub fs_type: String,
    /// Source path, device or dataset.
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trips_through_system_time() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            Timestamp {
                secs: -5,
                nanos: 250,
            },
        ] {
            assert_eq!(Timestamp::from(SystemTime::from(t)), t);
        }
    }

    #[test]
    fn oversized_label_is_invalid_argument() {
        let mut labels = Labels::new();
        labels.insert("k".into(), "v".repeat(MAX_LABEL_SIZE));
        let e = validate_labels(&labels).unwrap_err();
        assert_eq!(e.code(), crate::error::Code::InvalidArgument);
        labels.insert("k".into(), "v".repeat(MAX_LABEL_SIZE - 1));
        validate_labels(&labels).unwrap();
    }

    #[test]
    fn empty_and_huge_keys_are_invalid_argument() {
        assert!(validate_key("key", "").is_err());
        assert!(validate_key("key", &"x".repeat(MAX_KEY_SIZE + 1)).is_err());
        validate_key("key", "/tmp/../../etc/passwd").unwrap();
    }

    #[test]
    fn truncated_message_keeps_char_boundaries() {
        let s = "é".repeat(200);
        let m = truncate_for_message(&s);
        assert!(m.contains("400 bytes"));
    }
}
