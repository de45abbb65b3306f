//! The Prometheus endpoint: off by default, and when configured it reports
//! calls, errors by code, snapshots and bytes by kind, quota state and
//! startup repair actions. Runs on either backend (COWSNAP_TEST_BACKEND).

mod common;

use std::io::{Read, Write};

use common::*;
use cowsnap::backend::btrfs::testutil::LoopBtrfs;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;

fn scrape(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn metrics_endpoint_reports_calls_state_and_errors() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::on(LoopBtrfs::new().unwrap(), "");
    d.extra_config = format!("metrics_address = \"{addr}\"");
    d.use_backend_from_env();
    d.spawn().await;
    let mut c = d.client().await;
    c.prepare(pb::PrepareSnapshotRequest {
        key: "a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.commit(pb::CommitSnapshotRequest {
        name: "base".into(),
        key: "a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.prepare(pb::PrepareSnapshotRequest {
        key: "b".into(),
        parent: "base".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = c
        .prepare(pb::PrepareSnapshotRequest {
            key: "b".into(),
            ..Default::default()
        })
        .await;
    assert!(e.is_err());

    let text = scrape(&addr, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Full qgroups where the kernel has no simple quotas (before 6.7); ZFS
    // accounts per dataset.
    let mode = if backend_is_zfs() {
        "cowsnap_quota_mode{mode=\"zfs\"} 1"
    } else if std::path::Path::new("/sys/fs/btrfs/features/simple_quota").exists() {
        "cowsnap_quota_mode{mode=\"simple\"} 1"
    } else {
        "cowsnap_quota_mode{mode=\"full\"} 1"
    };
    for line in [
        "cowsnap_snapshots{kind=\"active\"} 1",
        "cowsnap_snapshots{kind=\"committed\"} 1",
        "cowsnap_snapshots{kind=\"view\"} 0",
        mode,
        "cowsnap_quota_consistent 1",
        "cowsnap_rpc_errors_total{method=\"prepare\",code=\"AlreadyExists\"} 1",
        "cowsnap_rpc_duration_seconds_count{method=\"prepare\"} 3",
        "cowsnap_rpc_duration_seconds_count{method=\"commit\"} 1",
        "cowsnap_repair_actions_total{action=\"orphan_destroyed\"} 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(scrape(&addr, "/other").starts_with("HTTP/1.1 404"));
    drop(c);
    assert!(d.stop(), "SIGTERM: {}", d.log_text());
    assert!(d.inventory().is_clean());
}
