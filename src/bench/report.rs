//! The side-by-side table of one or more runs' JSON lines, with ratios
//! against containerd's built-in btrfs and overlayfs snapshotters, and the
//! issue's targets checked.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::record::{Better, Record, fmt_value};

/// Who is who in the records.
#[derive(Clone, Debug)]
pub struct Labels {
    /// cowsnap on its own socket.
    pub direct: String,
    /// cowsnap on its own socket, without Commit's durability step
    /// (`btrfs.commit_sync = false`).
    pub nosync: String,
    /// cowsnap as containerd's proxy plugin.
    pub via: String,
    /// containerd's built-in btrfs snapshotter.
    pub btrfs: String,
    /// containerd's built-in overlayfs snapshotter.
    pub overlay: String,
}

impl Default for Labels {
    fn default() -> Labels {
        Labels {
            direct: "cowsnap".into(),
            nosync: "cowsnap-nosync".into(),
            via: "ctrd/cowsnap".into(),
            btrfs: "ctrd/btrfs".into(),
            overlay: "ctrd/overlayfs".into(),
        }
    }
}

/// Parses JSON lines (other lines, e.g. logs, are skipped).
pub fn parse(text: &str) -> Vec<Record> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The figures by (workload, metric) in first-seen order, then by label
/// (a later record of the same figure replaces an earlier one).
struct Table {
    rows: Vec<(String, String, String, Better)>,
    values: BTreeMap<(String, String, String), f64>,
    labels: Vec<String>,
}

impl Table {
    fn new(records: &[Record], l: &Labels) -> Table {
        let mut t = Table {
            rows: Vec::new(),
            values: BTreeMap::new(),
            labels: Vec::new(),
        };
        let preferred = [&l.direct, &l.nosync, &l.via, &l.btrfs, &l.overlay];
        for p in preferred {
            if records.iter().any(|r| &r.label == p) {
                t.labels.push(p.clone());
            }
        }
        for r in records {
            if !t.labels.contains(&r.label) {
                t.labels.push(r.label.clone());
            }
            if !t
                .rows
                .iter()
                .any(|(w, m, _, _)| w == &r.workload && m == &r.metric)
            {
                t.rows.push((
                    r.workload.clone(),
                    r.metric.clone(),
                    r.unit.clone(),
                    r.better,
                ));
            }
            t.values.insert(
                (r.workload.clone(), r.metric.clone(), r.label.clone()),
                r.value,
            );
        }
        t
    }

    fn get(&self, workload: &str, metric: &str, label: &str) -> Option<f64> {
        self.values
            .get(&(workload.into(), metric.into(), label.into()))
            .copied()
    }
}

/// Renders the side-by-side table and the targets, as aligned text or as
/// Markdown.
pub fn render(records: &[Record], l: &Labels, markdown: bool) -> String {
    let t = Table::new(records, l);
    let ratios: Vec<(String, String, String)> = [
        (&l.via, &l.btrfs),
        (&l.direct, &l.btrfs),
        (&l.nosync, &l.btrfs),
        (&l.via, &l.overlay),
    ]
    .into_iter()
    .filter(|(a, b)| t.labels.contains(a) && t.labels.contains(b))
    .map(|(a, b)| (format!("{a} ÷ {b}"), a.clone(), b.clone()))
    .collect();

    let mut header = vec!["workload".to_string(), "metric".into(), "unit".into()];
    header.extend(t.labels.iter().cloned());
    header.extend(ratios.iter().map(|(h, _, _)| h.clone()));
    let mut rows = Vec::new();
    for (w, m, unit, better) in &t.rows {
        let mut row = vec![w.clone(), m.clone(), unit.clone()];
        for label in &t.labels {
            row.push(t.get(w, m, label).map_or("-".into(), fmt_value));
        }
        for (_, a, b) in &ratios {
            let cell = match (*better, t.get(w, m, a), t.get(w, m, b)) {
                (Better::None, _, _) => String::new(),
                (_, Some(x), Some(y)) if y != 0.0 => format!("{}×", fmt_value(x / y)),
                _ => "-".into(),
            };
            row.push(cell);
        }
        rows.push(row);
    }
    let mut out = table(&header, &rows, markdown);
    out.push('\n');
    let checks = check_targets(&t, l);
    if !checks.is_empty() {
        let header: Vec<String> = ["target", "who", "measured", "goal", "result"]
            .into_iter()
            .map(String::from)
            .collect();
        out.push_str(&table(&header, &checks, markdown));
    }
    out
}

fn table(header: &[String], rows: &[Vec<String>], markdown: bool) -> String {
    let mut out = String::new();
    if markdown {
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let seps: Vec<&str> = header
            .iter()
            .enumerate()
            .map(|(i, _)| if i < 3 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(out, "|{}|", seps.join("|"));
        for r in rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        return out;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            if i < 3 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
            s.push_str("  ");
        }
        s.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(header));
    for r in rows {
        let _ = writeln!(out, "{}", line(r));
    }
    out
}

/// Which metric a target looks at.
enum Metric {
    /// Exactly this name.
    Exact(&'static str),
    /// `<number><suffix>` with the largest number present (the largest
    /// file count, layer count, client count a run measured).
    Largest(&'static str),
}

/// What a target demands.
enum Goal {
    /// subject ÷ reference ≤ x.
    RatioAtMost(&'static str, f64),
    /// subject ÷ reference ≥ x.
    RatioAtLeast(&'static str, f64),
    /// |value| ≤ x.
    AbsAtMost(f64),
}

struct Target {
    what: &'static str,
    workload: &'static str,
    metric: Metric,
    goal: Goal,
}

const BTRFS: &str = "btrfs";
const OVERLAY: &str = "overlay";

fn targets() -> Vec<Target> {
    use Goal::*;
    use Metric::*;
    let r = |what, workload, metric, goal| Target {
        what,
        workload,
        metric,
        goal,
    };
    vec![
        r(
            "Prepare p50",
            "cycles",
            Exact("prepare.p50"),
            RatioAtMost(BTRFS, 0.5),
        ),
        r(
            "Commit p50",
            "cycles",
            Exact("commit.p50"),
            RatioAtMost(BTRFS, 0.5),
        ),
        r(
            "Remove p50",
            "cycles",
            Exact("remove.p50"),
            RatioAtMost(BTRFS, 0.5),
        ),
        r(
            "layer chain total",
            "chain",
            Largest("-layers.total"),
            RatioAtMost(BTRFS, 0.5),
        ),
        r(
            "Usage p50, most files",
            "usage",
            Largest("-files.p50"),
            RatioAtMost(BTRFS, 0.01),
        ),
        r(
            "Usage bytes vs written, most files",
            "usage",
            Largest("-files.bytes-error"),
            AbsAtMost(1.0),
        ),
        r(
            "List p50, no filter",
            "list",
            Exact("all.p50"),
            RatioAtMost(BTRFS, 0.5),
        ),
        r(
            "List p50, name filter",
            "list",
            Exact("name-filter.p50"),
            RatioAtMost(BTRFS, 0.5),
        ),
        r(
            "List p50, label filter",
            "list",
            Exact("label-filter.p50"),
            RatioAtMost(BTRFS, 0.5),
        ),
        r(
            "throughput, most clients",
            "concurrent",
            Largest("-clients.throughput"),
            RatioAtLeast(BTRFS, 3.0),
        ),
        r(
            "RSS idle (MiB)",
            "memory",
            Exact("rss.idle"),
            AbsAtMost(20.0),
        ),
        r(
            "startup with most snapshots (s)",
            "startup",
            Largest("-snapshots"),
            AbsAtMost(1.0),
        ),
        r(
            "image unpack p50",
            "image",
            Exact("unpack.p50"),
            RatioAtMost(OVERLAY, 1.0),
        ),
        r(
            "container start p50",
            "image",
            Exact("run.p50"),
            RatioAtMost(OVERLAY, 1.0),
        ),
    ]
}

fn resolve(t: &Table, workload: &str, metric: &Metric) -> Option<String> {
    match metric {
        Metric::Exact(m) => Some((*m).to_owned()),
        Metric::Largest(suffix) => t
            .rows
            .iter()
            .filter(|(w, _, _, _)| w == workload)
            .filter_map(|(_, m, _, _)| {
                let n: u64 = m.strip_suffix(suffix)?.parse().ok()?;
                Some((n, m.clone()))
            })
            .max()
            .map(|(_, m)| m),
    }
}

fn check_targets(t: &Table, l: &Labels) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for target in targets() {
        let Some(metric) = resolve(t, target.workload, &target.metric) else {
            continue;
        };
        let what = format!("{} ({}.{})", target.what, target.workload, metric);
        for who in [&l.via, &l.direct] {
            let Some(v) = t.get(target.workload, &metric, who) else {
                continue;
            };
            let (measured, goal, ok) = match target.goal {
                Goal::AbsAtMost(x) => (fmt_value(v), format!("≤ {}", fmt_value(x)), v.abs() <= x),
                Goal::RatioAtMost(r, x) | Goal::RatioAtLeast(r, x) => {
                    let (reference, name) = if r == BTRFS {
                        (&l.btrfs, "btrfs")
                    } else {
                        (&l.overlay, "overlayfs")
                    };
                    let Some(base) = t.get(target.workload, &metric, reference) else {
                        continue;
                    };
                    if base == 0.0 {
                        continue;
                    }
                    let ratio = v / base;
                    let at_most = matches!(target.goal, Goal::RatioAtMost(..));
                    let sign = if at_most { "≤" } else { "≥" };
                    let ok = if at_most { ratio <= x } else { ratio >= x };
                    (
                        format!("{}×", fmt_value(ratio)),
                        format!("{sign} {}× {name}", fmt_value(x)),
                        ok,
                    )
                }
            };
            out.push(vec![
                what.clone(),
                who.clone(),
                measured,
                goal,
                if ok { "met" } else { "MISSED" }.into(),
            ]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, workload: &str, metric: &str, value: f64, better: Better) -> Record {
        Record {
            label: label.into(),
            workload: workload.into(),
            metric: metric.into(),
            value,
            unit: "ms".into(),
            better,
            samples: 1,
        }
    }

    #[test]
    fn ratios_compare_with_btrfs_and_targets_are_checked() {
        let records = vec![
            rec("ctrd/btrfs", "cycles", "prepare.p50", 10.0, Better::Lower),
            rec("ctrd/cowsnap", "cycles", "prepare.p50", 4.0, Better::Lower),
            rec("ctrd/btrfs", "cycles", "commit.p50", 10.0, Better::Lower),
            rec("ctrd/cowsnap", "cycles", "commit.p50", 6.0, Better::Lower),
        ];
        let text = render(&records, &Labels::default(), false);
        assert!(text.contains("0.400×"), "{text}");
        let prepare = text
            .lines()
            .find(|l| l.starts_with("Prepare p50"))
            .expect("prepare target");
        assert!(prepare.ends_with("met"), "{prepare}");
        let commit = text
            .lines()
            .find(|l| l.starts_with("Commit p50"))
            .expect("commit target");
        assert!(commit.ends_with("MISSED"), "{commit}");
    }

    #[test]
    fn the_largest_measured_count_is_the_one_checked() {
        let records = vec![
            rec("ctrd/btrfs", "usage", "1-files.p50", 1.0, Better::Lower),
            rec(
                "ctrd/btrfs",
                "usage",
                "100000-files.p50",
                1000.0,
                Better::Lower,
            ),
            rec(
                "ctrd/cowsnap",
                "usage",
                "100000-files.p50",
                1.0,
                Better::Lower,
            ),
            rec(
                "ctrd/btrfs",
                "usage",
                "10000-files.p50",
                100.0,
                Better::Lower,
            ),
        ];
        let text = render(&records, &Labels::default(), true);
        assert!(text.contains("usage.100000-files.p50"), "{text}");
        assert!(text.contains("| 0.00100× |"), "{text}");
    }

    #[test]
    fn commits_without_the_sync_get_a_column_and_a_ratio_of_their_own() {
        let records = vec![
            rec("ctrd/btrfs", "commits", "large.p50", 40.0, Better::Lower),
            rec("cowsnap", "commits", "large.p50", 20.0, Better::Lower),
            rec("cowsnap-nosync", "commits", "large.p50", 4.0, Better::Lower),
            rec(
                "cowsnap",
                "commits",
                "8-clients.btrfs-commits-per-commit",
                0.5,
                Better::None,
            ),
        ];
        let text = render(&records, &Labels::default(), true);
        let header = text.lines().next().expect("header");
        assert!(
            header.starts_with(
                "| workload | metric | unit | cowsnap | cowsnap-nosync | ctrd/btrfs | \
                 cowsnap ÷ ctrd/btrfs | cowsnap-nosync ÷ ctrd/btrfs |"
            ),
            "{header}"
        );
        assert!(
            text.contains("| commits | large.p50 | ms | 20 | 4 | 40 | 0.500× | 0.100× |"),
            "{text}"
        );
        // Counts are shown, not compared.
        assert!(text.contains("| 0.500 | - | - |  |  |"), "{text}");
    }

    #[test]
    fn lines_that_are_not_json_are_skipped() {
        let r = parse(
            "log line\n{\"label\":\"a\",\"workload\":\"w\",\"metric\":\"m\",\"value\":1,\"unit\":\"ms\",\"better\":\"lower\"}\n",
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].samples, 0);
    }
}
