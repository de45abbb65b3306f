//! Snapshots as the CLI shows them: the JSON document of one snapshot
//! (`ls`, `inspect`, `quota`), the `ls` table and the `inspect` page.

use std::collections::BTreeMap;

use serde::Serialize;

use super::format::{human_bytes, kind_name, printable, relative, rfc3339, rfc3339_seconds};
use super::table::{Align, Table, key_values};
use crate::proto::cowsnap::admin::v1 as pb;

/// One snapshot in `--json` output. Field names are stable; absent values
/// are `null`, never missing.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotDoc {
    /// cowsnap's id.
    pub id: u64,
    /// Key (active, view) or name (committed).
    pub key: String,
    /// `active`, `view` or `committed`.
    pub kind: &'static str,
    /// The parent's key, if any.
    pub parent: Option<String>,
    /// The parent's id, if any.
    pub parent_id: Option<u64>,
    /// Labels, sorted by key.
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, UTC.
    pub created_at: Option<String>,
    /// RFC 3339, UTC.
    pub updated_at: Option<String>,
    /// Space figures, when they were read.
    pub space: Option<SpaceDoc>,
    /// Size limit in bytes, if one is set.
    pub limit_bytes: Option<u64>,
    /// Where the object is (a path for btrfs).
    pub object: String,
    /// The backend's id of the object (btrfs subvolume id).
    pub native_id: u64,
    /// Number of children.
    pub children: u64,
    /// The children's keys (`inspect` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub child_keys: Option<Vec<String>>,
}

/// Space figures of a snapshot in `--json` output, in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct SpaceDoc {
    /// Bytes only this snapshot holds.
    pub exclusive_bytes: u64,
    /// Bytes this snapshot refers to, shared or not.
    pub referenced_bytes: u64,
    /// Bytes recorded at commit (committed snapshots; 0 for the others).
    pub committed_bytes: u64,
    /// Inodes created beyond the parent (committed snapshots: recorded at
    /// commit; 0 for the other kinds).
    pub inodes: u64,
}

impl SnapshotDoc {
    /// The document of a snapshot from the API.
    pub fn from_pb(s: &pb::Snapshot) -> SnapshotDoc {
        SnapshotDoc {
            id: s.id,
            key: s.key.clone(),
            kind: kind_name(s.kind),
            parent: (!s.parent.is_empty()).then(|| s.parent.clone()),
            parent_id: (s.parent_id != 0).then_some(s.parent_id),
            labels: s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            created_at: s.created_at.as_ref().map(rfc3339),
            updated_at: s.updated_at.as_ref().map(rfc3339),
            space: s.space.as_ref().map(|sp| SpaceDoc {
                exclusive_bytes: sp.exclusive_bytes,
                referenced_bytes: sp.referenced_bytes,
                committed_bytes: sp.committed_bytes,
                inodes: sp.inodes,
            }),
            limit_bytes: (s.limit_bytes != 0).then_some(s.limit_bytes),
            object: s.object.clone(),
            native_id: s.native_id,
            children: s.children,
            child_keys: None,
        }
    }
}

/// How `ls` prints times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeStyle {
    /// `5m ago`, relative to a given now (seconds since the epoch).
    Relative(i64),
    /// RFC 3339 to the second.
    Absolute,
}

fn time_cell(t: Option<&prost_types::Timestamp>, style: TimeStyle) -> String {
    match (t, style) {
        (None, _) => "-".into(),
        (Some(t), TimeStyle::Relative(now)) => relative(t, now),
        (Some(t), TimeStyle::Absolute) => rfc3339_seconds(t),
    }
}

/// The `ls` table: ID, KEY, KIND, PARENT, CREATED, [EXCLUSIVE, REFERENCED,]
/// LABELS (a count).
pub fn ls_table(snapshots: &[pb::Snapshot], with_usage: bool, time: TimeStyle) -> String {
    let mut cols = vec![
        ("ID", Align::Right),
        ("KEY", Align::Left),
        ("KIND", Align::Left),
        ("PARENT", Align::Left),
        ("CREATED", Align::Left),
    ];
    if with_usage {
        cols.push(("EXCLUSIVE", Align::Right));
        cols.push(("REFERENCED", Align::Right));
    }
    cols.push(("LABELS", Align::Right));
    let mut t = Table::new(&cols);
    for s in snapshots {
        let mut row = vec![
            s.id.to_string(),
            printable(&s.key).into_owned(),
            kind_name(s.kind).to_owned(),
            if s.parent.is_empty() {
                "-".to_owned()
            } else {
                printable(&s.parent).into_owned()
            },
            time_cell(s.created_at.as_ref(), time),
        ];
        if with_usage {
            match &s.space {
                Some(sp) => {
                    row.push(human_bytes(sp.exclusive_bytes));
                    row.push(human_bytes(sp.referenced_bytes));
                }
                None => row.extend(["-".to_owned(), "-".to_owned()]),
            }
        }
        row.push(s.labels.len().to_string());
        t.row(row);
    }
    t.render()
}

/// `ls --quiet`: one key per line.
pub fn ls_keys(snapshots: &[pb::Snapshot]) -> String {
    let mut out = String::new();
    for s in snapshots {
        out.push_str(&printable(&s.key));
        out.push('\n');
    }
    out
}

fn bytes_and_human(b: u64) -> String {
    if b < 1024 {
        human_bytes(b)
    } else {
        format!("{} ({b} bytes)", human_bytes(b))
    }
}

/// The `inspect` page: every field, the space figures, the children's keys
/// and the labels.
pub fn inspect_text(s: &pb::Snapshot, child_keys: &[String], now: i64) -> String {
    let when = |t: Option<&prost_types::Timestamp>| match t {
        Some(t) => format!("{} ({})", rfc3339(t), relative(t, now)),
        None => "-".into(),
    };
    let mut pairs = vec![
        ("ID", s.id.to_string()),
        ("Key", printable(&s.key).into_owned()),
        ("Kind", kind_name(s.kind).to_owned()),
        (
            "Parent",
            if s.parent.is_empty() {
                "-".into()
            } else {
                format!("{} (id {})", printable(&s.parent), s.parent_id)
            },
        ),
        ("Created", when(s.created_at.as_ref())),
        ("Updated", when(s.updated_at.as_ref())),
        (
            "Object",
            format!("{} (native id {})", s.object, s.native_id),
        ),
        (
            "Limit",
            if s.limit_bytes == 0 {
                "none".into()
            } else {
                bytes_and_human(s.limit_bytes)
            },
        ),
    ];
    if let Some(sp) = &s.space {
        pairs.push(("Exclusive", bytes_and_human(sp.exclusive_bytes)));
        pairs.push(("Referenced", bytes_and_human(sp.referenced_bytes)));
        // Both are recorded at commit: the API reports 0 for the other
        // kinds, which would read as "empty".
        if s.kind == pb::Kind::Committed as i32 {
            pairs.push(("Committed", bytes_and_human(sp.committed_bytes)));
            pairs.push(("Inodes", sp.inodes.to_string()));
        }
    }
    pairs.push(("Children", s.children.to_string()));
    pairs.push(("Labels", s.labels.len().to_string()));
    let block = key_values(&pairs);
    // The children's keys go under the Children line, before the last
    // (Labels) line; rendering the pairs together keeps one alignment.
    let labels_line = block
        .trim_end_matches('\n')
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let mut out = block[..labels_line].to_owned();
    for k in child_keys {
        out.push_str(&format!("  {}\n", printable(k)));
    }
    out.push_str(&block[labels_line..]);
    let mut labels: Vec<_> = s.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        out.push_str(&format!("  {}={}\n", printable(k), printable(v)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn snap(
        id: u64,
        key: &str,
        kind: pb::Kind,
        parent: Option<(&str, u64)>,
    ) -> pb::Snapshot {
        pb::Snapshot {
            id,
            key: key.into(),
            kind: kind as i32,
            parent: parent.map(|p| p.0.to_owned()).unwrap_or_default(),
            parent_id: parent.map(|p| p.1).unwrap_or(0),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_714_557_600,
                nanos: 0,
            }),
            object: format!("/r/x/{id}"),
            native_id: 256 + id,
            ..Default::default()
        }
    }

    #[test]
    fn json_document_uses_null_for_absent_values() {
        let mut s = snap(3, "ctr", pb::Kind::Active, Some(("base", 1)));
        s.labels.insert("b".into(), "2".into());
        s.labels.insert("a".into(), "1".into());
        let v = serde_json::to_value(SnapshotDoc::from_pb(&s)).unwrap();
        assert_eq!(v["kind"], "active");
        assert_eq!(v["parent"], "base");
        assert_eq!(v["parent_id"], 1);
        assert_eq!(v["limit_bytes"], serde_json::Value::Null);
        assert_eq!(v["space"], serde_json::Value::Null);
        assert_eq!(v["created_at"], "2024-05-01T10:00:00Z");
        assert!(v.get("child_keys").is_none());
        let text = serde_json::to_string(&v["labels"]).unwrap();
        assert_eq!(text, r#"{"a":"1","b":"2"}"#);
        let root = serde_json::to_value(SnapshotDoc::from_pb(&snap(
            1,
            "b",
            pb::Kind::Committed,
            None,
        )))
        .unwrap();
        assert_eq!(root["parent"], serde_json::Value::Null);
        assert_eq!(root["parent_id"], serde_json::Value::Null);
    }

    #[test]
    fn ls_table_shows_usage_columns_only_when_asked() {
        let mut base = snap(1, "base", pb::Kind::Committed, None);
        base.space = Some(pb::Space {
            exclusive_bytes: 4 << 20,
            referenced_bytes: 4 << 20,
            ..Default::default()
        });
        let mut ctr = snap(2, "ctr", pb::Kind::Active, Some(("base", 1)));
        ctr.labels.insert("x".into(), "y".into());
        let now = 1_714_557_600 + 300;
        let plain = ls_table(
            &[base.clone(), ctr.clone()],
            false,
            TimeStyle::Relative(now),
        );
        let want = [
            "ID   KEY    KIND        PARENT   CREATED   LABELS",
            " 1   base   committed   -        5m ago         0",
            " 2   ctr    active      base     5m ago         1",
        ];
        assert_eq!(plain.lines().collect::<Vec<_>>(), want, "{plain}");
        let usage = ls_table(&[base, ctr], true, TimeStyle::Absolute);
        let lines: Vec<&str> = usage.lines().collect();
        assert!(lines[0].contains("EXCLUSIVE   REFERENCED"), "{usage}");
        assert!(
            lines[1].contains("2024-05-01T10:00:00Z     4.0 MiB      4.0 MiB"),
            "{usage}"
        );
        assert!(lines[2].contains("-            -"), "{usage}");
    }

    #[test]
    fn inspect_page_lists_children_and_sorted_labels() {
        let mut s = snap(1, "base", pb::Kind::Committed, None);
        s.children = 2;
        s.limit_bytes = 10 << 30;
        s.labels.insert("z".into(), "last".into());
        s.labels.insert("a".into(), "first".into());
        s.space = Some(pb::Space {
            exclusive_bytes: 1536,
            referenced_bytes: 1536,
            inodes: 3,
            committed_bytes: 1024,
        });
        let text = inspect_text(&s, &["c1".into(), "c2".into()], 1_714_557_600 + 10);
        assert!(text.contains("Kind:        committed\n"), "{text}");
        assert!(
            text.contains("Limit:       10.0 GiB (10737418240 bytes)\n"),
            "{text}"
        );
        assert!(
            text.contains("Exclusive:   1.5 KiB (1536 bytes)\n"),
            "{text}"
        );
        assert!(
            text.contains("Committed:   1.0 KiB (1024 bytes)\n"),
            "{text}"
        );
        assert!(
            text.contains("Created:     2024-05-01T10:00:00Z (10s ago)\n"),
            "{text}"
        );
        assert!(text.contains("Children:    2\n  c1\n  c2\n"), "{text}");
        assert!(
            text.ends_with("Labels:      2\n  a=first\n  z=last\n"),
            "{text}"
        );
    }

    #[test]
    fn keys_are_printed_with_control_characters_escaped() {
        let s = snap(1, "evil\x1b]0;x\x07", pb::Kind::Active, None);
        assert_eq!(ls_keys(&[s]), "evil\\u{1b}]0;x\\u{7}\n");
    }
}
