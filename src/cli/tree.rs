//! `tree`: snapshots as a forest of parent → children, roots first, in id
//! order at every level so the output is the same on every run.
//!
//! The walk uses an explicit stack: chains of thousands of snapshots must
//! not overflow the call stack.

use std::collections::HashMap;

use serde::Serialize;

use super::format::{human_bytes, kind_name, printable};
use crate::proto::cowsnap::admin::v1 as pb;

/// One snapshot in the forest, in pre-order (a parent before its
/// children). Also the `--json` form: the order and `depth` encode the
/// tree without nesting, so no reader hits a recursion limit on a deep
/// chain.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TreeNode {
    /// Snapshot id.
    pub id: u64,
    /// Key or name.
    pub key: String,
    /// `active`, `view` or `committed`.
    pub kind: &'static str,
    /// Parent id (`null` for a root of the forest shown).
    pub parent_id: Option<u64>,
    /// 0 for a root, 1 for its children, ...
    pub depth: usize,
    /// Exclusive bytes, when space figures were read.
    pub exclusive_bytes: Option<u64>,
    /// Whether it is the last of its siblings (for drawing).
    #[serde(skip)]
    pub last: bool,
}

/// The forest of `snaps` in pre-order, or only the subtree of the snapshot
/// with id `top`. A snapshot whose parent is not listed is a root; members
/// of a parent cycle (impossible in valid metadata) are shown from their
/// smallest id instead of being lost.
pub fn forest(snaps: &[pb::Snapshot], top: Option<u64>) -> Vec<TreeNode> {
    let index: HashMap<u64, usize> = snaps.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); snaps.len()];
    let mut roots = Vec::new();
    for (i, s) in snaps.iter().enumerate() {
        match index.get(&s.parent_id) {
            Some(&p) if s.parent_id != 0 && p != i => children[p].push(i),
            _ => roots.push(i),
        }
    }
    let by_id = |v: &mut Vec<usize>| v.sort_by_key(|&i| snaps[i].id);
    children.iter_mut().for_each(by_id);
    let mut starts: Vec<usize> = match top {
        Some(id) => index.get(&id).map(|&i| vec![i]).unwrap_or_default(),
        None => roots,
    };
    by_id(&mut starts);

    let mut visited = vec![false; snaps.len()];
    let mut out = Vec::with_capacity(snaps.len());
    walk(snaps, &children, &starts, &mut visited, &mut out);
    if top.is_none() {
        // Whatever no root reached sits on a cycle.
        while let Some(i) = (0..snaps.len())
            .filter(|&i| !visited[i])
            .min_by_key(|&i| snaps[i].id)
        {
            walk(snaps, &children, &[i], &mut visited, &mut out);
        }
    }
    out
}

/// Appends the trees under `starts` in pre-order, skipping what was
/// visited already.
fn walk(
    snaps: &[pb::Snapshot],
    children: &[Vec<usize>],
    starts: &[usize],
    visited: &mut [bool],
    out: &mut Vec<TreeNode>,
) {
    // (index, depth, last among siblings, parent id as shown)
    let mut stack: Vec<(usize, usize, bool, Option<u64>)> = starts
        .iter()
        .rev()
        .enumerate()
        .map(|(n, &i)| (i, 0, n == 0, None))
        .collect();
    while let Some((i, depth, last, parent_id)) = stack.pop() {
        if std::mem::replace(&mut visited[i], true) {
            continue;
        }
        let s = &snaps[i];
        out.push(TreeNode {
            id: s.id,
            key: s.key.clone(),
            kind: kind_name(s.kind),
            parent_id,
            depth,
            exclusive_bytes: s.space.as_ref().map(|sp| sp.exclusive_bytes),
            last,
        });
        for (n, &c) in children[i].iter().rev().enumerate() {
            stack.push((c, depth + 1, n == 0, Some(s.id)));
        }
    }
}

/// The forest drawn with box characters:
///
/// ```text
/// 1 base [committed, 4.0 MiB]
/// ├── 2 ctr [active, 2.0 MiB]
/// └── 3 v [view, 16.0 KiB]
/// ```
pub fn render(nodes: &[TreeNode]) -> String {
    let mut out = String::new();
    // For each depth above the current node: whether the ancestor at that
    // depth was the last of its siblings (then its column is blank).
    let mut lasts: Vec<bool> = Vec::new();
    for n in nodes {
        lasts.truncate(n.depth);
        if n.depth > 0 {
            for &ancestor_last in lasts.iter().skip(1) {
                out.push_str(if ancestor_last { "    " } else { "│   " });
            }
            out.push_str(if n.last { "└── " } else { "├── " });
        }
        lasts.push(n.last);
        out.push_str(&format!("{} {} [{}", n.id, printable(&n.key), n.kind));
        if let Some(b) = n.exclusive_bytes {
            out.push_str(", ");
            out.push_str(&human_bytes(b));
        }
        out.push_str("]\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: u64, parent_id: u64, kind: pb::Kind) -> pb::Snapshot {
        pb::Snapshot {
            id,
            key: format!("k{id}"),
            kind: kind as i32,
            parent_id,
            space: Some(pb::Space {
                exclusive_bytes: id * 1024,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sample() -> Vec<pb::Snapshot> {
        use pb::Kind::*;
        // Deliberately out of order.
        vec![
            s(5, 2, Active),
            s(2, 1, Committed),
            s(7, 0, Committed),
            s(1, 0, Committed),
            s(3, 1, View),
            s(6, 2, Active),
            s(8, 7, Active),
        ]
    }

    #[test]
    fn roots_first_children_in_id_order() {
        let text = render(&forest(&sample(), None));
        assert_eq!(
            text,
            "1 k1 [committed, 1.0 KiB]\n\
             ├── 2 k2 [committed, 2.0 KiB]\n\
             │   ├── 5 k5 [active, 5.0 KiB]\n\
             │   └── 6 k6 [active, 6.0 KiB]\n\
             └── 3 k3 [view, 3.0 KiB]\n\
             7 k7 [committed, 7.0 KiB]\n\
             └── 8 k8 [active, 8.0 KiB]\n"
        );
    }

    #[test]
    fn a_subtree_starts_at_the_given_snapshot() {
        let nodes = forest(&sample(), Some(2));
        let ids: Vec<_> = nodes.iter().map(|n| (n.id, n.depth, n.parent_id)).collect();
        assert_eq!(ids, [(2, 0, None), (5, 1, Some(2)), (6, 1, Some(2))]);
        assert!(forest(&sample(), Some(99)).is_empty());
    }

    #[test]
    fn blank_columns_under_last_children() {
        use pb::Kind::*;
        let snaps = vec![
            s(1, 0, Committed),
            s(2, 1, Committed),
            s(3, 2, Active),
            s(4, 1, View),
        ];
        let mut nodes = forest(&snaps, None);
        // Make 2 the last child by dropping 4.
        nodes.retain(|n| n.id != 4);
        nodes[1].last = true;
        assert_eq!(
            render(&nodes),
            "1 k1 [committed, 1.0 KiB]\n└── 2 k2 [committed, 2.0 KiB]\n    └── 3 k3 [active, 3.0 KiB]\n"
        );
    }

    #[test]
    fn deep_chains_and_cycles_do_not_overflow_or_vanish() {
        use pb::Kind::*;
        let mut snaps: Vec<_> = (1..=20_000u64).map(|id| s(id, id - 1, Committed)).collect();
        snaps.push(s(30_001, 30_002, Active));
        snaps.push(s(30_002, 30_001, Active));
        let nodes = forest(&snaps, None);
        assert_eq!(nodes.len(), 20_002);
        assert_eq!(nodes[19_999].depth, 19_999);
        assert_eq!((nodes[20_000].id, nodes[20_000].depth), (30_001, 0));
        assert_eq!((nodes[20_001].id, nodes[20_001].depth), (30_002, 1));
        let json = serde_json::to_value(&nodes[..2]).unwrap();
        assert_eq!(json[1]["parent_id"], 1);
        assert_eq!(json[1]["exclusive_bytes"], 2048);
        assert!(json[1].get("last").is_none());
    }
}
