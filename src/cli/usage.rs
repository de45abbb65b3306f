//! `usage`: who holds the space. Per snapshot exclusive, referenced and
//! chain bytes; per chain; grouped by a label's value or by top-level
//! ancestor; sorted, cut to the top N, with a footer that reconciles the
//! snapshots' figures with the filesystem's.
//!
//! Everything here is O(n) in the number of snapshots apart from the sort:
//! chain sums follow the `parent_id` links once, memoised, with an explicit
//! stack (a chain may be thousands of snapshots deep).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::str::FromStr;

use serde::Serialize;

use super::format::{human_bytes, kind_name, printable};
use super::table::{Align, Table, key_values};
use crate::proto::cowsnap::admin::v1 as pb;

/// What a row of `usage` stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// One row per snapshot.
    Snapshot,
    /// One row per chain: a snapshot nothing descends from, with its
    /// ancestors.
    Chain,
    /// One row per value of this label; snapshots without it in one row.
    Label(String),
    /// One row per top-level ancestor (base layer) with everything above it.
    Root,
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "snapshot" => Ok(GroupBy::Snapshot),
            "chain" => Ok(GroupBy::Chain),
            "root" => Ok(GroupBy::Root),
            _ => match s.strip_prefix("label:") {
                Some(key) if !key.is_empty() => Ok(GroupBy::Label(key.to_owned())),
                _ => Err(format!(
                    "{s:?}: expected snapshot, chain, root or label:KEY (e.g. label:containerd.io/snapshot/image)"
                )),
            },
        }
    }
}

impl GroupBy {
    fn name(&self) -> &'static str {
        match self {
            GroupBy::Snapshot => "snapshot",
            GroupBy::Chain => "chain",
            GroupBy::Label(_) => "label",
            GroupBy::Root => "root",
        }
    }
}

/// The order of `usage` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Largest exclusive bytes first.
    Exclusive,
    /// Largest referenced bytes first.
    Referenced,
    /// Largest chain bytes first.
    Chain,
    /// By key or group name, A to Z.
    Name,
    /// Most snapshots first (groups and chains).
    Count,
}

impl SortKey {
    fn name(self) -> &'static str {
        match self {
            SortKey::Exclusive => "exclusive",
            SortKey::Referenced => "referenced",
            SortKey::Chain => "chain",
            SortKey::Name => "name",
            SortKey::Count => "count",
        }
    }
}

/// Derived per-snapshot figures, indexed like the input slice.
#[derive(Debug, Clone, Default)]
pub struct Lineage {
    /// Exclusive bytes of the snapshot and all its ancestors.
    pub chain: Vec<u64>,
    /// Number of snapshots in that chain (1 for a snapshot without parent).
    pub length: Vec<u32>,
    /// Index of the top-level ancestor (itself for a snapshot without
    /// parent).
    pub root: Vec<usize>,
    /// Whether some snapshot names this one as its parent.
    pub has_children: Vec<bool>,
}

fn exclusive(s: &pb::Snapshot) -> u64 {
    s.space.as_ref().map_or(0, |sp| sp.exclusive_bytes)
}

fn referenced(s: &pb::Snapshot) -> u64 {
    s.space.as_ref().map_or(0, |sp| sp.referenced_bytes)
}

/// Chain sums, lengths, roots and child flags of `snaps` in O(n). A parent
/// id not in the list (or 0) ends a chain; a cycle (impossible in valid
/// metadata) is cut where it is found rather than looping.
pub fn lineage(snaps: &[pb::Snapshot]) -> Lineage {
    let n = snaps.len();
    let index: HashMap<u64, usize> = snaps.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let parent: Vec<Option<usize>> = snaps
        .iter()
        .map(|s| {
            (s.parent_id != 0)
                .then(|| index.get(&s.parent_id).copied())
                .flatten()
        })
        .collect();
    let mut out = Lineage {
        chain: vec![0; n],
        length: vec![0; n],
        root: (0..n).collect(),
        has_children: vec![false; n],
    };
    for p in parent.iter().flatten() {
        out.has_children[*p] = true;
    }
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        OnStack,
        Done,
    }
    let mut state = vec![State::New; n];
    let mut stack = Vec::new();
    for start in 0..n {
        if state[start] == State::Done {
            continue;
        }
        // Climb to the first ancestor already done (or the top).
        let mut at = start;
        loop {
            state[at] = State::OnStack;
            stack.push(at);
            match parent[at] {
                Some(p) if state[p] == State::New => at = p,
                _ => break,
            }
        }
        // Come back down, each node from its parent's figures.
        while let Some(i) = stack.pop() {
            match parent[i] {
                Some(p) if state[p] == State::Done => {
                    out.chain[i] = out.chain[p].saturating_add(exclusive(&snaps[i]));
                    out.length[i] = out.length[p].saturating_add(1);
                    out.root[i] = out.root[p];
                }
                // No parent, or a cycle back into the stack: a top.
                _ => {
                    out.chain[i] = exclusive(&snaps[i]);
                    out.length[i] = 1;
                    out.root[i] = i;
                }
            }
            state[i] = State::Done;
        }
    }
    out
}

/// One row of `usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// Key (snapshot, chain, root rows) or label value; `None` for the
    /// snapshots without the label.
    pub name: Option<String>,
    /// Snapshot id (snapshot rows, the tip of a chain, the root).
    pub id: Option<u64>,
    /// Kind (snapshot and chain rows).
    pub kind: Option<&'static str>,
    /// Snapshots the row covers (the chain's length for chain rows).
    pub snapshots: u64,
    /// Sum of exclusive bytes of the snapshots the row covers; for a chain
    /// row, of its tip only.
    #[serde(rename = "exclusive_bytes")]
    pub exclusive: u64,
    /// Referenced bytes of the snapshot (snapshot and chain rows).
    #[serde(rename = "referenced_bytes")]
    pub referenced: Option<u64>,
    /// Exclusive bytes of the snapshot and all its ancestors (snapshot and
    /// chain rows).
    #[serde(rename = "chain_bytes")]
    pub chain: Option<u64>,
    /// Size limit of the snapshot, if one is set (snapshot rows).
    #[serde(rename = "limit_bytes")]
    pub limit: Option<u64>,
}

/// What `usage` was asked.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// Row grouping.
    pub by: GroupBy,
    /// Order; `None` for the default (chain bytes for chains, exclusive
    /// bytes otherwise).
    pub sort: Option<SortKey>,
    /// Keep only the first N rows.
    pub top: Option<usize>,
    /// Count only snapshots of this kind (`active`, `view`, `committed`)
    /// as rows or group members; chains still include every ancestor.
    pub kind: Option<&'static str>,
}

/// The computed rows.
#[derive(Debug, Clone)]
pub struct UsageTable {
    /// Row grouping.
    pub by: GroupBy,
    /// The order used.
    pub sort: SortKey,
    /// The rows, sorted, cut to the top N.
    pub rows: Vec<UsageRow>,
    /// Rows before the cut.
    pub rows_total: usize,
}

/// Rows for `query` over `snaps` (every snapshot, as the Usage call
/// returns them).
pub fn compute(snaps: &[pb::Snapshot], query: &UsageQuery) -> UsageTable {
    let lin = lineage(snaps);
    let wanted = |s: &pb::Snapshot| query.kind.is_none_or(|k| kind_name(s.kind) == k);
    let snapshot_row = |i: usize, s: &pb::Snapshot, snapshots: u64| UsageRow {
        name: Some(s.key.clone()),
        id: Some(s.id),
        kind: Some(kind_name(s.kind)),
        snapshots,
        exclusive: exclusive(s),
        referenced: Some(referenced(s)),
        chain: Some(lin.chain[i]),
        limit: (s.limit_bytes != 0).then_some(s.limit_bytes),
    };
    let mut rows: Vec<UsageRow> = match &query.by {
        GroupBy::Snapshot => snaps
            .iter()
            .enumerate()
            .filter(|(_, s)| wanted(s))
            .map(|(i, s)| snapshot_row(i, s, 1))
            .collect(),
        GroupBy::Chain => snaps
            .iter()
            .enumerate()
            .filter(|(i, s)| !lin.has_children[*i] && wanted(s))
            .map(|(i, s)| snapshot_row(i, s, u64::from(lin.length[i])))
            .collect(),
        GroupBy::Label(key) => {
            let mut groups: HashMap<Option<&str>, (u64, u64)> = HashMap::new();
            for s in snaps.iter().filter(|s| wanted(s)) {
                let g = groups
                    .entry(s.labels.get(key).map(String::as_str))
                    .or_default();
                g.0 += 1;
                g.1 = g.1.saturating_add(exclusive(s));
            }
            groups
                .into_iter()
                .map(|(value, (count, excl))| UsageRow {
                    name: value.map(str::to_owned),
                    id: None,
                    kind: None,
                    snapshots: count,
                    exclusive: excl,
                    referenced: None,
                    chain: None,
                    limit: None,
                })
                .collect()
        }
        GroupBy::Root => {
            let mut groups: Vec<(u64, u64)> = vec![(0, 0); snaps.len()];
            for (i, s) in snaps.iter().enumerate().filter(|(_, s)| wanted(s)) {
                let g = &mut groups[lin.root[i]];
                g.0 += 1;
                g.1 = g.1.saturating_add(exclusive(s));
            }
            groups
                .into_iter()
                .enumerate()
                .filter(|(_, (count, _))| *count > 0)
                .map(|(r, (count, excl))| UsageRow {
                    name: Some(snaps[r].key.clone()),
                    id: Some(snaps[r].id),
                    kind: None,
                    snapshots: count,
                    exclusive: excl,
                    referenced: None,
                    chain: None,
                    limit: None,
                })
                .collect()
        }
    };
    let sort = query.sort.unwrap_or(match query.by {
        GroupBy::Chain => SortKey::Chain,
        _ => SortKey::Exclusive,
    });
    rows.sort_by(|a, b| compare(a, b, sort));
    let rows_total = rows.len();
    if let Some(top) = query.top {
        rows.truncate(top);
    }
    UsageTable {
        by: query.by.clone(),
        sort,
        rows,
        rows_total,
    }
}

/// Sizes and counts descending, names ascending; ties by name then id so
/// the output is the same on every run. Rows without a name (the label's
/// "(none)" group) come after named ones.
fn compare(a: &UsageRow, b: &UsageRow, sort: SortKey) -> Ordering {
    let by_name = || (a.name.is_none(), &a.name, a.id).cmp(&(b.name.is_none(), &b.name, b.id));
    let first = match sort {
        SortKey::Exclusive => b.exclusive.cmp(&a.exclusive),
        SortKey::Referenced => b.referenced.cmp(&a.referenced),
        SortKey::Chain => b.chain.cmp(&a.chain),
        SortKey::Count => b.snapshots.cmp(&a.snapshots),
        SortKey::Name => Ordering::Equal,
    };
    first.then_with(by_name)
}

/// The filesystem's figures in `--json` output.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FilesystemDoc {
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Bytes in use on it.
    pub used_bytes: u64,
    /// Sum of every snapshot's exclusive bytes.
    pub accounted_bytes: u64,
    /// Used bytes no snapshot's exclusive figure covers.
    pub unaccounted_bytes: u64,
    /// `simple`, `full` or the backend's own name.
    pub quota_mode: String,
    /// Whether the filesystem reports its accounting consistent.
    pub quota_consistent: bool,
}

impl FilesystemDoc {
    /// From the API's figures.
    pub fn from_pb(fs: &pb::FilesystemSpace) -> FilesystemDoc {
        FilesystemDoc {
            total_bytes: fs.total_bytes,
            used_bytes: fs.used_bytes,
            accounted_bytes: fs.accounted_bytes,
            unaccounted_bytes: fs.unaccounted_bytes,
            quota_mode: fs.quota_mode.clone(),
            quota_consistent: fs.quota_consistent,
        }
    }
}

/// `usage --json`.
#[derive(Debug, Clone, Serialize)]
pub struct UsageDoc {
    /// `snapshot`, `chain`, `label` or `root`.
    pub by: &'static str,
    /// The label grouped by (`by` = `label`).
    pub label: Option<String>,
    /// `exclusive`, `referenced`, `chain`, `name` or `count`.
    pub sort: &'static str,
    /// The rows shown.
    pub rows: Vec<UsageRow>,
    /// Rows before `--top` cut them.
    pub rows_total: usize,
    /// Snapshots on the daemon.
    pub snapshots: usize,
    /// The filesystem's figures.
    pub filesystem: FilesystemDoc,
}

/// The JSON document of a computed table.
pub fn to_doc(t: &UsageTable, snapshots: usize, fs: &pb::FilesystemSpace) -> UsageDoc {
    UsageDoc {
        by: t.by.name(),
        label: match &t.by {
            GroupBy::Label(k) => Some(k.clone()),
            _ => None,
        },
        sort: t.sort.name(),
        rows: t.rows.clone(),
        rows_total: t.rows_total,
        snapshots,
        filesystem: FilesystemDoc::from_pb(fs),
    }
}

/// The human table with its footer.
pub fn render(t: &UsageTable, snapshots: usize, fs: &pb::FilesystemSpace) -> String {
    let opt_bytes = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), human_bytes);
    let name = |r: &UsageRow| match &r.name {
        Some(n) => printable(n).into_owned(),
        None => "(none)".to_owned(),
    };
    let id = |r: &UsageRow| r.id.map_or_else(|| "-".to_owned(), |i| i.to_string());
    let table = match &t.by {
        GroupBy::Snapshot => {
            let mut tab = Table::new(&[
                ("ID", Align::Right),
                ("KEY", Align::Left),
                ("KIND", Align::Left),
                ("EXCLUSIVE", Align::Right),
                ("REFERENCED", Align::Right),
                ("CHAIN", Align::Right),
                ("LIMIT", Align::Right),
            ]);
            for r in &t.rows {
                tab.row(vec![
                    id(r),
                    name(r),
                    r.kind.unwrap_or("-").to_owned(),
                    human_bytes(r.exclusive),
                    opt_bytes(r.referenced),
                    opt_bytes(r.chain),
                    opt_bytes(r.limit),
                ]);
            }
            tab
        }
        GroupBy::Chain => {
            let mut tab = Table::new(&[
                ("ID", Align::Right),
                ("KEY", Align::Left),
                ("KIND", Align::Left),
                ("LENGTH", Align::Right),
                ("EXCLUSIVE", Align::Right),
                ("REFERENCED", Align::Right),
                ("CHAIN", Align::Right),
            ]);
            for r in &t.rows {
                tab.row(vec![
                    id(r),
                    name(r),
                    r.kind.unwrap_or("-").to_owned(),
                    r.snapshots.to_string(),
                    human_bytes(r.exclusive),
                    opt_bytes(r.referenced),
                    opt_bytes(r.chain),
                ]);
            }
            tab
        }
        GroupBy::Label(_) | GroupBy::Root => {
            let root = t.by == GroupBy::Root;
            let mut tab = if root {
                Table::new(&[
                    ("ID", Align::Right),
                    ("ROOT", Align::Left),
                    ("SNAPSHOTS", Align::Right),
                    ("EXCLUSIVE", Align::Right),
                ])
            } else {
                Table::new(&[
                    ("VALUE", Align::Left),
                    ("SNAPSHOTS", Align::Right),
                    ("EXCLUSIVE", Align::Right),
                ])
            };
            for r in &t.rows {
                let mut row = Vec::with_capacity(4);
                if root {
                    row.push(id(r));
                }
                row.extend([name(r), r.snapshots.to_string(), human_bytes(r.exclusive)]);
                tab.row(row);
            }
            tab
        }
    };
    let mut out = table.render();
    out.push('\n');
    out.push_str(&footer(t, snapshots, fs));
    out
}

fn footer(t: &UsageTable, snapshots: usize, fs: &pb::FilesystemSpace) -> String {
    let mut pairs = Vec::new();
    if t.rows.len() < t.rows_total {
        let what = match t.by {
            GroupBy::Snapshot => "snapshots",
            GroupBy::Chain => "chains",
            _ => "groups",
        };
        let shown = if t.by == GroupBy::Chain {
            // Chains share ancestors: their sums overlap and do not add up.
            format!("{} of {} {what}", t.rows.len(), t.rows_total)
        } else {
            let sum: u64 = t
                .rows
                .iter()
                .map(|r| r.exclusive)
                .fold(0, u64::saturating_add);
            format!(
                "{} of {} {what}, {} exclusive",
                t.rows.len(),
                t.rows_total,
                human_bytes(sum)
            )
        };
        pairs.push(("Shown", shown));
    }
    // The two figures that add up to "used" line up with each other.
    let (accounted, unaccounted) = (
        human_bytes(fs.accounted_bytes),
        human_bytes(fs.unaccounted_bytes),
    );
    let w = accounted.len().max(unaccounted.len());
    pairs.push((
        "Accounted",
        format!("{accounted:>w$}   exclusive bytes of all {snapshots} snapshots"),
    ));
    let shared = if fs.quota_mode == "full" {
        ", data snapshots share (full qgroups count it in no snapshot's exclusive)"
    } else {
        ""
    };
    pairs.push((
        "Unaccounted",
        format!(
            "{unaccounted:>w$}   used, but by no snapshot: filesystem metadata, the metadata \
             database, other data, space not yet freed{shared}"
        ),
    ));
    let percent = if fs.total_bytes > 0 {
        format!(
            " ({:.1}%)",
            fs.used_bytes as f64 * 100.0 / fs.total_bytes as f64
        )
    } else {
        String::new()
    };
    pairs.push((
        "Filesystem",
        format!(
            "{} used of {}{percent}",
            human_bytes(fs.used_bytes),
            human_bytes(fs.total_bytes)
        ),
    ));
    pairs.push(("Quota", quota_state(&fs.quota_mode, fs.quota_consistent)));
    key_values(&pairs)
}

/// `simple, consistent` or a warning that the figures cannot be trusted.
pub fn quota_state(mode: &str, consistent: bool) -> String {
    if consistent {
        format!("{mode}, consistent")
    } else {
        format!(
            "{mode}, INCONSISTENT: space figures are unreliable until a rescan \
             (cowsnap check --repair)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn s(id: u64, parent_id: u64, kind: pb::Kind, excl: u64) -> pb::Snapshot {
        pb::Snapshot {
            id,
            key: format!("k{id}"),
            kind: kind as i32,
            parent_id,
            parent: if parent_id == 0 {
                String::new()
            } else {
                format!("k{parent_id}")
            },
            space: Some(pb::Space {
                exclusive_bytes: excl,
                referenced_bytes: excl * 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn q(by: GroupBy) -> UsageQuery {
        UsageQuery {
            by,
            sort: None,
            top: None,
            kind: None,
        }
    }

    /// base(1) <- mid(2) <- {ctr(3), view(4)}; other(5) <- ctr2(6).
    fn small() -> Vec<pb::Snapshot> {
        use pb::Kind::*;
        let mut v = vec![
            s(1, 0, Committed, 100),
            s(2, 1, Committed, 20),
            s(3, 2, Active, 5),
            s(4, 2, View, 1),
            s(5, 0, Committed, 50),
            s(6, 5, Active, 7),
        ];
        v[0].labels.insert("image".into(), "a".into());
        v[1].labels.insert("image".into(), "a".into());
        v[4].labels.insert("image".into(), "b".into());
        v
    }

    #[test]
    fn chain_sums_add_every_ancestor_once() {
        let snaps = small();
        let lin = lineage(&snaps);
        assert_eq!(lin.chain, [100, 120, 125, 121, 50, 57]);
        assert_eq!(lin.length, [1, 2, 3, 3, 1, 2]);
        assert_eq!(lin.root, [0, 0, 0, 0, 4, 4]);
        assert_eq!(lin.has_children, [true, true, false, false, true, false]);
    }

    #[test]
    fn snapshot_rows_sort_by_exclusive_then_name() {
        let t = compute(&small(), &q(GroupBy::Snapshot));
        let ids: Vec<_> = t.rows.iter().map(|r| r.id.unwrap()).collect();
        assert_eq!(ids, [1, 5, 2, 6, 3, 4]);
        assert_eq!(t.rows[2].chain, Some(120));
        assert_eq!(t.rows[2].referenced, Some(40));
        let by_name = compute(
            &small(),
            &UsageQuery {
                sort: Some(SortKey::Name),
                ..q(GroupBy::Snapshot)
            },
        );
        let names: Vec<_> = by_name
            .rows
            .iter()
            .map(|r| r.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["k1", "k2", "k3", "k4", "k5", "k6"]);
    }

    #[test]
    fn chains_are_the_tips_with_their_ancestors() {
        let t = compute(&small(), &q(GroupBy::Chain));
        let rows: Vec<_> = t
            .rows
            .iter()
            .map(|r| (r.id.unwrap(), r.snapshots, r.chain.unwrap()))
            .collect();
        assert_eq!(rows, [(3, 3, 125), (4, 3, 121), (6, 2, 57)]);
        assert_eq!(t.sort, SortKey::Chain);
    }

    #[test]
    fn label_groups_put_unlabelled_snapshots_in_none() {
        let t = compute(&small(), &q(GroupBy::Label("image".into())));
        let rows: Vec<_> = t
            .rows
            .iter()
            .map(|r| (r.name.clone(), r.snapshots, r.exclusive))
            .collect();
        assert_eq!(
            rows,
            [
                (Some("a".to_owned()), 2, 120),
                (Some("b".to_owned()), 1, 50),
                (None, 3, 13)
            ]
        );
    }

    #[test]
    fn root_groups_partition_the_snapshots() {
        let t = compute(&small(), &q(GroupBy::Root));
        let rows: Vec<_> = t
            .rows
            .iter()
            .map(|r| (r.id.unwrap(), r.snapshots, r.exclusive))
            .collect();
        assert_eq!(rows, [(1, 4, 126), (5, 2, 57)]);
    }

    #[test]
    fn kind_filter_and_top_cut_rows_but_not_chains() {
        let t = compute(
            &small(),
            &UsageQuery {
                kind: Some("active"),
                top: Some(1),
                ..q(GroupBy::Snapshot)
            },
        );
        assert_eq!(t.rows_total, 2);
        assert_eq!(t.rows.len(), 1);
        assert_eq!((t.rows[0].id, t.rows[0].chain), (Some(6), Some(57)));
    }

    #[test]
    fn missing_parents_and_cycles_end_chains() {
        use pb::Kind::*;
        // 2's parent 99 is not listed; 3 and 4 name each other.
        let snaps = vec![
            s(2, 99, Active, 1),
            s(3, 4, Committed, 2),
            s(4, 3, Committed, 3),
        ];
        let lin = lineage(&snaps);
        assert_eq!(lin.chain[0], 1);
        assert_eq!(lin.length[0], 1);
        // One of the cycle's members is taken as the top; the sums stay finite.
        assert!(lin.chain[1] <= 5 && lin.chain[2] <= 5, "{:?}", lin.chain);
    }

    #[test]
    fn footer_reconciles_with_the_filesystem() {
        let fs = pb::FilesystemSpace {
            total_bytes: 20 << 30,
            used_bytes: 3 << 20,
            accounted_bytes: 2 << 20,
            unaccounted_bytes: 1 << 20,
            quota_mode: "simple".into(),
            quota_consistent: true,
        };
        let t = compute(
            &small(),
            &UsageQuery {
                top: Some(2),
                ..q(GroupBy::Snapshot)
            },
        );
        let text = render(&t, 6, &fs);
        assert!(
            text.starts_with("ID   KEY   KIND        EXCLUSIVE   REFERENCED   CHAIN   LIMIT\n"),
            "{text}"
        );
        assert!(
            text.contains("Shown:        2 of 6 snapshots, 150 B exclusive\n"),
            "{text}"
        );
        assert!(
            text.contains("Accounted:    2.0 MiB   exclusive bytes of all 6 snapshots\n"),
            "{text}"
        );
        assert!(
            text.contains("Unaccounted:  1.0 MiB   used, but by no snapshot"),
            "{text}"
        );
        assert!(
            text.contains("Filesystem:   3.0 MiB used of 20.0 GiB (0.0%)\n"),
            "{text}"
        );
        assert!(
            text.ends_with("Quota:        simple, consistent\n"),
            "{text}"
        );
        let doc = serde_json::to_value(to_doc(&t, 6, &fs)).unwrap();
        assert_eq!(doc["rows"][0]["exclusive_bytes"], 100);
        assert_eq!(doc["rows"][0]["chain_bytes"], 100);
        assert_eq!(doc["rows_total"], 6);
        assert_eq!(doc["filesystem"]["unaccounted_bytes"], 1 << 20);
        assert_eq!(doc["label"], serde_json::Value::Null);
    }

    #[test]
    fn group_by_parses_label_keys() {
        assert_eq!("chain".parse(), Ok(GroupBy::Chain));
        assert_eq!(
            "label:containerd.io/x".parse(),
            Ok(GroupBy::Label("containerd.io/x".into()))
        );
        assert!("label:".parse::<GroupBy>().is_err());
        assert!("size".parse::<GroupBy>().is_err());
    }

    /// 10 000 snapshots: a chain 5 000 deep and 5 000 children of one
    /// snapshot, every grouping computed (the figure for the report is
    /// printed; the bound is loose so a busy CI machine does not flake).
    fn ten_thousand() -> Vec<pb::Snapshot> {
        use pb::Kind::*;
        let mut snaps = Vec::with_capacity(10_000);
        for id in 1..=5_000u64 {
            let mut x = s(id, id - 1, Committed, 1);
            x.labels.insert("image".into(), format!("img{}", id % 10));
            snaps.push(x);
        }
        for id in 5_001..=10_000u64 {
            snaps.push(s(id, 1, Active, 2));
        }
        // Listed in reverse so children come before their parents.
        snaps.reverse();
        snaps
    }

    #[test]
    fn ten_thousand_snapshots_group_correctly_and_fast() {
        let snaps = ten_thousand();
        let start = Instant::now();
        let by_snapshot = compute(&snaps, &q(GroupBy::Snapshot));
        let by_chain = compute(&snaps, &q(GroupBy::Chain));
        let by_label = compute(&snaps, &q(GroupBy::Label("image".into())));
        let by_root = compute(&snaps, &q(GroupBy::Root));
        let elapsed = start.elapsed();
        eprintln!("usage over 10 000 snapshots, four groupings: {elapsed:?}");
        assert!(elapsed.as_secs_f64() < 1.0, "{elapsed:?}");

        assert_eq!(by_snapshot.rows.len(), 10_000);
        let deepest = by_snapshot
            .rows
            .iter()
            .find(|r| r.id == Some(5_000))
            .unwrap();
        assert_eq!(deepest.chain, Some(5_000));
        let child = by_snapshot
            .rows
            .iter()
            .find(|r| r.id == Some(7_000))
            .unwrap();
        assert_eq!(child.chain, Some(3));
        // Tips: the chain's end and the 5 000 fan-out children.
        assert_eq!(by_chain.rows.len(), 5_001);
        assert_eq!(by_chain.rows[0].id, Some(5_000));
        assert_eq!(by_chain.rows[0].snapshots, 5_000);
        assert_eq!(by_label.rows.len(), 11);
        let none = by_label.rows.iter().find(|r| r.name.is_none()).unwrap();
        assert_eq!((none.snapshots, none.exclusive), (5_000, 10_000));
        assert_eq!(by_root.rows.len(), 1);
        assert_eq!(by_root.rows[0].snapshots, 10_000);
        assert_eq!(by_root.rows[0].exclusive, 15_000);
    }

    #[test]
    #[ignore = "measurement: cargo test --lib usage_timing -- --ignored --nocapture"]
    fn usage_timing_for_ten_thousand_snapshots() {
        let snaps = ten_thousand();
        let fs = pb::FilesystemSpace::default();
        for by in [
            GroupBy::Snapshot,
            GroupBy::Chain,
            GroupBy::Label("image".into()),
            GroupBy::Root,
        ] {
            let start = Instant::now();
            let t = compute(&snaps, &q(by.clone()));
            let computed = start.elapsed();
            let text = render(&t, snaps.len(), &fs);
            let json = serde_json::to_string(&to_doc(&t, snaps.len(), &fs)).unwrap();
            eprintln!(
                "{by:?}: compute {computed:?}, compute+table {:?} ({} bytes of text, {} of JSON)",
                start.elapsed(),
                text.len(),
                json.len()
            );
        }
    }
}
