//! `status`, `check` and `cleanup` output: their JSON documents and text.

use serde::Serialize;

use super::format::{human_bytes, printable, relative, rfc3339, rfc3339_seconds};
use super::table::{Align, Table, key_values};
use super::usage::quota_state;
use crate::proto::cowsnap::admin::v1 as pb;

/// `status --json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusDoc {
    /// The daemon's version.
    pub version: String,
    /// The backend, e.g. `btrfs at /var/lib/cowsnap (simple quotas)`.
    pub backend: String,
    /// The daemon's root directory.
    pub root: String,
    /// The socket the CLI talked to.
    pub address: String,
    /// `simple`, `full` or the backend's own name.
    pub quota_mode: String,
    /// Whether the filesystem reports its accounting consistent.
    pub quota_consistent: bool,
    /// Snapshots of every kind.
    pub snapshots: u64,
    /// Active snapshots.
    pub active: u64,
    /// Views.
    pub views: u64,
    /// Committed snapshots.
    pub committed: u64,
    /// When the daemon started, RFC 3339 UTC.
    pub started_at: Option<String>,
}

impl StatusDoc {
    /// From the API's answer and the socket used.
    pub fn from_pb(st: &pb::StatusResponse, address: &str) -> StatusDoc {
        StatusDoc {
            version: st.version.clone(),
            backend: st.backend.clone(),
            root: st.root.clone(),
            address: address.to_owned(),
            quota_mode: st.quota_mode.clone(),
            quota_consistent: st.quota_consistent,
            snapshots: st.snapshots,
            active: st.active,
            views: st.views,
            committed: st.committed,
            started_at: st.started_at.as_ref().map(rfc3339),
        }
    }
}

/// The `status` page.
pub fn status_text(st: &pb::StatusResponse, address: &str, now: i64) -> String {
    let started = match &st.started_at {
        Some(t) => format!("{} ({})", rfc3339_seconds(t), relative(t, now)),
        None => "-".into(),
    };
    key_values(&[
        ("Daemon", format!("cowsnap {} at {address}", st.version)),
        ("Started", started),
        ("Backend", st.backend.clone()),
        ("Root", st.root.clone()),
        ("Quota", quota_state(&st.quota_mode, st.quota_consistent)),
        (
            "Snapshots",
            format!(
                "{} ({} active, {} {}, {} committed)",
                st.snapshots,
                st.active,
                st.views,
                if st.views == 1 { "view" } else { "views" },
                st.committed
            ),
        ),
    ])
}

/// One finding in `check --json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FindingDoc {
    /// `orphan_object`, `missing_object`, `wrong_state`,
    /// `quota_inconsistent`, `stale_accounting`, `orphan_object_busy`.
    pub kind: String,
    /// The snapshot or object id concerned, if any.
    pub id: Option<u64>,
    /// The key concerned, if any.
    pub key: Option<String>,
    /// For people.
    pub detail: String,
    /// Whether `--repair` fixed it.
    pub repaired: bool,
}

/// `check --json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckDoc {
    /// Whether repairs were asked for.
    pub repair: bool,
    /// True when nothing is left unrepaired.
    pub consistent: bool,
    /// Everything found, repaired or not.
    pub findings: Vec<FindingDoc>,
}

impl CheckDoc {
    /// From the API's answer.
    pub fn from_pb(r: &pb::CheckResponse, repair: bool) -> CheckDoc {
        CheckDoc {
            repair,
            consistent: r.consistent,
            findings: r
                .findings
                .iter()
                .map(|f| FindingDoc {
                    kind: f.kind.clone(),
                    id: (f.id != 0).then_some(f.id),
                    key: (!f.key.is_empty()).then(|| f.key.clone()),
                    detail: f.detail.clone(),
                    repaired: f.repaired,
                })
                .collect(),
        }
    }
}

/// The `check` report: a table of findings and a verdict line.
pub fn check_text(r: &pb::CheckResponse, repair: bool) -> String {
    if r.findings.is_empty() {
        return "Consistent: metadata, filesystem objects and quota accounting agree.\n".into();
    }
    let mut t = Table::new(&[
        ("FINDING", Align::Left),
        ("ID", Align::Right),
        ("KEY", Align::Left),
        ("REPAIRED", Align::Left),
        ("DETAIL", Align::Left),
    ]);
    for f in &r.findings {
        t.row(vec![
            f.kind.clone(),
            if f.id == 0 {
                "-".into()
            } else {
                f.id.to_string()
            },
            if f.key.is_empty() {
                "-".into()
            } else {
                printable(&f.key).into_owned()
            },
            if f.repaired { "yes" } else { "no" }.into(),
            printable(&f.detail).into_owned(),
        ]);
    }
    let mut out = t.render();
    let open = r.findings.iter().filter(|f| !f.repaired).count();
    out.push('\n');
    out.push_str(&if r.consistent {
        format!(
            "Consistent: {} finding(s), all repaired.\n",
            r.findings.len()
        )
    } else if repair {
        format!(
            "Inconsistent: {open} of {} finding(s) could not be repaired (see DETAIL).\n",
            r.findings.len()
        )
    } else {
        format!("Inconsistent: {open} finding(s); `cowsnap check --repair` repairs what it can.\n")
    });
    out
}

/// `cleanup --json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CleanupDoc {
    /// Objects without a record that were destroyed.
    pub orphans_destroyed: u64,
    /// Objects without a record that could not be destroyed (busy).
    pub orphans_failed: u64,
    /// Accounting entries of deleted objects removed.
    pub stale_accounting_removed: u64,
    /// Bytes the destroyed orphans held, as last accounted.
    pub reclaimed_bytes: u64,
}

impl CleanupDoc {
    /// From the API's answer.
    pub fn from_pb(r: &pb::CleanupResponse) -> CleanupDoc {
        CleanupDoc {
            orphans_destroyed: r.orphans_destroyed,
            orphans_failed: r.orphans_failed,
            stale_accounting_removed: r.stale_accounting_removed,
            reclaimed_bytes: r.reclaimed_bytes,
        }
    }
}

/// The `cleanup` report.
pub fn cleanup_text(r: &pb::CleanupResponse) -> String {
    let mut pairs = vec![
        ("Orphans destroyed", r.orphans_destroyed.to_string()),
        ("Orphans failed", r.orphans_failed.to_string()),
        (
            "Stale accounting removed",
            r.stale_accounting_removed.to_string(),
        ),
        ("Reclaimed", human_bytes(r.reclaimed_bytes)),
    ];
    if r.orphans_failed > 0 {
        pairs[1]
            .1
            .push_str(" (busy: mounted or in use; retried by the next cleanup)");
    }
    key_values(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(kind: &str, id: u64, key: &str, repaired: bool) -> pb::Finding {
        pb::Finding {
            kind: kind.into(),
            id,
            key: key.into(),
            detail: format!("about {kind}"),
            repaired,
        }
    }

    #[test]
    fn check_text_says_what_remains_and_how_to_repair() {
        let clean = pb::CheckResponse {
            findings: vec![],
            consistent: true,
        };
        assert!(check_text(&clean, false).starts_with("Consistent"));
        let found = pb::CheckResponse {
            findings: vec![
                finding("orphan_object", 4242, "", false),
                finding("quota_inconsistent", 0, "", false),
            ],
            consistent: false,
        };
        let text = check_text(&found, false);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[0],
            "FINDING                ID   KEY   REPAIRED   DETAIL"
        );
        assert_eq!(
            lines[1],
            "orphan_object        4242   -     no         about orphan_object"
        );
        assert_eq!(
            lines[2],
            "quota_inconsistent      -   -     no         about quota_inconsistent"
        );
        assert!(text.ends_with(
            "Inconsistent: 2 finding(s); `cowsnap check --repair` repairs what it can.\n"
        ));
        let doc = serde_json::to_value(CheckDoc::from_pb(&found, false)).unwrap();
        assert_eq!(doc["findings"][1]["id"], serde_json::Value::Null);
        assert_eq!(doc["findings"][0]["id"], 4242);
        assert_eq!(doc["consistent"], false);
    }

    #[test]
    fn repaired_findings_leave_a_consistent_verdict() {
        let r = pb::CheckResponse {
            findings: vec![finding("orphan_object", 7, "", true)],
            consistent: true,
        };
        assert!(check_text(&r, true).ends_with("Consistent: 1 finding(s), all repaired.\n"));
        let partly = pb::CheckResponse {
            findings: vec![
                finding("orphan_object", 7, "", true),
                finding("missing_object", 8, "gone", false),
            ],
            consistent: false,
        };
        assert!(
            check_text(&partly, true)
                .ends_with("Inconsistent: 1 of 2 finding(s) could not be repaired (see DETAIL).\n")
        );
    }

    #[test]
    fn status_and_cleanup_pages() {
        let st = pb::StatusResponse {
            version: "0.1.0".into(),
            backend: "btrfs at /r (simple quotas)".into(),
            root: "/r".into(),
            quota_mode: "simple".into(),
            quota_consistent: false,
            snapshots: 3,
            active: 1,
            views: 1,
            committed: 1,
            started_at: Some(prost_types::Timestamp {
                seconds: 1_714_557_600,
                nanos: 0,
            }),
        };
        let text = status_text(&st, "/run/x.sock", 1_714_557_600 + 7200);
        assert!(
            text.contains("Daemon:     cowsnap 0.1.0 at /run/x.sock\n"),
            "{text}"
        );
        assert!(
            text.contains("Started:    2024-05-01T10:00:00Z (2h ago)\n"),
            "{text}"
        );
        assert!(text.contains("Quota:      simple, INCONSISTENT"), "{text}");
        assert!(
            text.contains("Snapshots:  3 (1 active, 1 view, 1 committed)\n"),
            "{text}"
        );
        let c = pb::CleanupResponse {
            orphans_destroyed: 2,
            orphans_failed: 1,
            stale_accounting_removed: 3,
            reclaimed_bytes: 3 << 20,
        };
        let text = cleanup_text(&c);
        assert!(text.contains("Orphans destroyed:         2\n"), "{text}");
        assert!(
            text.contains("Orphans failed:            1 (busy"),
            "{text}"
        );
        assert!(
            text.ends_with("Reclaimed:                 3.0 MiB\n"),
            "{text}"
        );
    }
}
