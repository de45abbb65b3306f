//! The Prometheus endpoint: off by default, and when configured it reports
//! calls, errors by code, snapshots and bytes by kind, quota state and
//! startup repair actions.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let fs = LoopBtrfs::new().unwrap();
    let root = fs.path().join("root");
    let socket = fs.path().join("s.sock");
    let addr = format!("127.0.0.1:{}", free_port());
    let config = fs.path().join("config.toml");
    std::fs::write(&config, format!("metrics_address = \"{addr}\"\n")).unwrap();
    let log = fs.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(["serve", "--root"])
        .arg(&root)
        .arg("--address")
        .arg(&socket)
        .arg("--config")
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = cowsnap::client::connect(&socket).await.unwrap();
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
    // Full qgroups where the kernel has no simple quotas (before 6.7).
    let mode = if std::path::Path::new("/sys/fs/btrfs/features/simple_quota").exists() {
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}
