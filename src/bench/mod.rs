//! The benchmark behind `cowsnap-bench` and `hack/bench`: the same
//! workloads against any snapshots socket (cowsnap's own, or containerd's
//! with a snapshotter name: its built-in btrfs or overlayfs, or cowsnap as a
//! proxy plugin), so that all are measured in one run on one filesystem.
//!
//! - [`target`]: the connection (socket, snapshotter name, namespace).
//! - [`mount`]: mounting what Prepare/View return, as containerd would.
//! - [`workloads`]: cycles, chain, usage, list, concurrent, populate.
//! - [`record`]: samples, percentiles, the JSON lines.
//! - [`report`]: the side-by-side table with ratios and the targets.
//! - [`powercut`]: the power-cut workload and its checker (hack/power-cut).
//!
//! docs/performance.md has the figures and how to reproduce them.

pub mod mount;
pub mod powercut;
pub mod record;
pub mod report;
pub mod target;
pub mod workloads;

use std::fs;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use target::Target;

/// The resident set size of process `pid`, in MiB (`VmRSS`).
pub fn rss_mib(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in {path}"))?;
    Ok(kib / 1024.0)
}

/// Waits until `target` answers an unfiltered List with at least `expect`
/// snapshots; returns the time since `since_unix_ns` (when the daemon was
/// started) and the count it listed.
pub async fn wait_list(
    target: &Target,
    since_unix_ns: u128,
    expect: usize,
    limit: Duration,
) -> Result<(Duration, usize), String> {
    let deadline = Instant::now() + limit;
    loop {
        let last_err = match try_list(target).await {
            Ok(n) if n >= expect => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_err(|e| format!("clock: {e}"))?
                    .as_nanos();
                let ns = now.saturating_sub(since_unix_ns);
                return Ok((Duration::from_nanos(ns as u64), n));
            }
            Ok(n) => format!("listed {n} snapshots, waiting for {expect}"),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not answer within {limit:?}: {last_err}",
                target.socket.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn try_list(target: &Target) -> Result<usize, String> {
    let mut conn = target.connect().await?;
    Ok(conn.list(&[]).await?.len())
}
