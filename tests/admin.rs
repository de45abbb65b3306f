//! The admin API over the daemon's socket: status, details, references,
//! the usage report, size limits and the consistency check.

mod common;

use common::*;
use cowsnap::proto::containerd::services::snapshots::v1 as spb;
use cowsnap::proto::cowsnap::admin::v1 as pb;
use cowsnap::proto::cowsnap::admin::v1::admin_client::AdminClient;
use tonic::Code;

async fn admin(d: &Daemon) -> AdminClient<tonic::transport::Channel> {
    let channel = cowsnap::client::connect_channel(&d.socket).await.unwrap();
    AdminClient::new(channel)
}

async fn inspect(
    a: &mut AdminClient<tonic::transport::Channel>,
    r: &str,
) -> Result<pb::Snapshot, tonic::Status> {
    a.inspect(pb::InspectRequest { r#ref: r.into() })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn status_list_and_references() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    let mut a = admin(&d).await;
    prepare(&mut c, "base-x", "").await.unwrap();
    commit(&mut c, "base", "base-x").await.unwrap();
    prepare(&mut c, "ctr", "base").await.unwrap();
    view(&mut c, "v", "base").await.unwrap();

    let st = a.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (st.snapshots, st.active, st.views, st.committed),
        (3, 1, 1, 1)
    );
    assert!(st.quota_consistent);
    assert!(st.backend.contains(backend_name()), "{}", st.backend);

    let all = a
        .list_snapshots(pb::ListSnapshotsRequest {
            filters: vec![],
            with_usage: true,
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(
        all.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
        ["base", "ctr", "v"]
    );
    let base = &all[0];
    assert_eq!(base.children, 2);
    assert!(base.space.is_some());
    if backend_is_zfs() {
        // The dataset's guid.
        assert_ne!(base.native_id, 0);
    } else {
        // A subvolume id: the first one made is 256.
        assert!(base.native_id >= 256, "{}", base.native_id);
    }
    assert!(base.object.ends_with(&format!("committed/{}", base.id)));

    // By key, by id, by id prefix (needs >= 3 digits, so ids are padded out
    // to 100+: k0..k9 get ids 4..13, then the counter jumps to 100).
    assert_eq!(
        inspect(&mut a, "ctr").await.unwrap().kind,
        pb::Kind::Active as i32
    );
    assert_eq!(
        inspect(&mut a, &base.id.to_string()).await.unwrap().key,
        "base"
    );
    for i in 0..10 {
        prepare(&mut c, &format!("k{i}"), "").await.unwrap();
    }
    drop((c, a));
    d.skip_ids_to(100).await;
    let (mut c, mut a) = (d.client().await, admin(&d).await);
    for i in 100..110 {
        prepare(&mut c, &format!("k{i}"), "").await.unwrap();
    }
    let k = inspect(&mut a, "k105").await.unwrap();
    assert!(k.id >= 100);
    let prefix = &k.id.to_string()[..3];
    let matches: Vec<_> = (1..=k.id + 10)
        .filter(|i| i.to_string().starts_with(prefix))
        .collect();
    if matches.len() == 1 {
        assert_eq!(inspect(&mut a, prefix).await.unwrap().id, k.id);
    }
    assert_eq!(inspect(&mut a, "10").await.unwrap().id, 10, "exact id wins");
    assert_eq!(
        inspect(&mut a, "nope").await.unwrap_err().code(),
        Code::NotFound
    );
    // "11" is an exact id; "1" is too short for a prefix but an exact id.
    assert_eq!(inspect(&mut a, "1").await.unwrap().id, 1);
}

#[tokio::test]
async fn ambiguous_id_prefix_lists_candidates() {
    let mut d = Daemon::start().await;
    // s{i} gets id i+1: s97 and s98 (ids 98, 99), then the id counter
    // jumps to 1000 for s999..=s1009 (ids 1000..=1010).
    d.skip_ids_to(98).await;
    let mut c = d.client().await;
    for i in 97..99 {
        prepare(&mut c, &format!("s{i}"), "").await.unwrap();
    }
    drop(c);
    d.skip_ids_to(1000).await;
    let mut c = d.client().await;
    let mut a = admin(&d).await;
    for i in 999..1010 {
        prepare(&mut c, &format!("s{i}"), "").await.unwrap();
    }
    // Without ids 100..=109, "100" is no exact id, and the prefix of
    // 1000..=1009: ambiguous.
    let e = inspect(&mut a, "100").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("ambiguous"), "{}", e.message());
    for id in 1000..1010 {
        assert!(
            e.message().contains(&format!("{id} (\"s{}\")", id - 1)),
            "{}",
            e.message()
        );
    }
    // A prefix with one match resolves; an exact id is not a prefix.
    assert_eq!(inspect(&mut a, "1005").await.unwrap().key, "s1004");
    assert_eq!(inspect(&mut a, "99").await.unwrap().key, "s98");
    assert_eq!(inspect(&mut a, "98").await.unwrap().id, 98);
    remove(&mut c, "s1009").await.unwrap();
    remove(&mut c, "s1008").await.unwrap();
    // "101" is no id, and the prefix of 1010..: none left (1010 was
    // s1009, removed), so it matches nothing.
    assert_eq!(
        inspect(&mut a, "101").await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn usage_report_reconciles_with_the_filesystem() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mut a = admin(&d).await;
    let dir = mount_dir(&prepare(&mut c, "a", "").await.unwrap());
    write_pattern(&dir.join("f"), 4 << 20, 1);
    commit(&mut c, "base", "a").await.unwrap();
    let dir = mount_dir(&prepare(&mut c, "ctr", "base").await.unwrap());
    write_pattern(&dir.join("g"), 2 << 20, 2);
    d.sync_usage();
    let report = a.usage(pb::UsageRequest {}).await.unwrap().into_inner();
    let fs = report.filesystem.unwrap();
    let sum: u64 = report
        .snapshots
        .iter()
        .map(|s| s.space.as_ref().unwrap().exclusive_bytes)
        .sum();
    assert_eq!(fs.accounted_bytes, sum);
    assert_eq!(fs.accounted_bytes + fs.unaccounted_bytes, fs.used_bytes);
    // Simple quotas and ZFS charge base's 4 MiB to base; btrfs full
    // qgroups (kernels before 6.7) count bytes shared with a child as
    // no one's exclusive bytes, leaving only ctr's 2 MiB.
    let mode = a
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .quota_mode;
    let least = if mode == "full" { 2 << 20 } else { 6 << 20 };
    assert!(sum >= least, "accounted {sum} ({mode} accounting)");
    let base = report.snapshots.iter().find(|s| s.key == "base").unwrap();
    assert!(base.space.as_ref().unwrap().committed_bytes >= 4 << 20);
}

#[tokio::test]
async fn max_size_label_and_quota_command_limit_writes() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mut a = admin(&d).await;
    let m = c
        .prepare(spb::PrepareSnapshotRequest {
            key: "limited".into(),
            labels: labels(&[("containerd.io/snapshot/max-size", "4M")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let dir = mount_dir(&m);
    let err = write_until_error(&dir.join("big"), 16 << 20);
    assert_eq!(
        err,
        Some(libc::EDQUOT),
        "a write beyond the label's limit fails"
    );
    assert_eq!(
        inspect(&mut a, "limited").await.unwrap().limit_bytes,
        4 << 20
    );

    // A bad label value creates nothing.
    let e = c
        .prepare(spb::PrepareSnapshotRequest {
            key: "bad".into(),
            labels: labels(&[("containerd.io/snapshot/max-size", "lots")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        stat(&mut c, "bad").await.unwrap_err().code(),
        Code::NotFound
    );

    // The quota command sets and clears a limit on an existing snapshot.
    let dir = mount_dir(&prepare(&mut c, "free", "").await.unwrap());
    let s = a
        .set_quota(pb::SetQuotaRequest {
            r#ref: "free".into(),
            limit_bytes: 2 << 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.limit_bytes, 2 << 20);
    assert_eq!(
        write_until_error(&dir.join("x"), 8 << 20),
        Some(libc::EDQUOT)
    );
    std::fs::remove_file(dir.join("x")).unwrap();
    nix::unistd::sync();
    let s = a
        .set_quota(pb::SetQuotaRequest {
            r#ref: "free".into(),
            limit_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.limit_bytes, 0);
    assert_eq!(write_until_error(&dir.join("y"), 8 << 20), None);
}

/// Writes `len` bytes in 1 MiB chunks with fsync; returns the errno that
/// stopped it, if any.
fn write_until_error(path: &std::path::Path, len: usize) -> Option<i32> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0;
    while written < len {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            return e.raw_os_error();
        }
        written += chunk.len();
    }
    None
}

#[tokio::test]
async fn check_during_a_remove_reports_no_orphan() {
    // The Remove pauses right after dropping the record: its object has no
    // record and is not destroyed (or queued) yet, and is no orphan.
    let d = Daemon::start_with_failpoints("remove.after_meta=pause").await;
    let mut c = d.client().await;
    let mut a = admin(&d).await;
    prepare(&mut c, "going", "").await.unwrap();
    let mut rc = d.client().await;
    let removing = tokio::spawn(async move { remove(&mut rc, "going").await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!removing.is_finished(), "the Remove did not pause");
    let mid = a
        .check(pb::CheckRequest { repair: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!removing.is_finished(), "the check ran after the Remove");
    assert!(mid.consistent && mid.findings.is_empty(), "{mid:?}");
    removing.await.unwrap().unwrap();
    assert_eq!(
        stat(&mut c, "going").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}

#[tokio::test]
async fn check_reports_and_repairs() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mut a = admin(&d).await;
    prepare(&mut c, "keep", "").await.unwrap();
    prepare(&mut c, "gone", "").await.unwrap();
    let clean = a
        .check(pb::CheckRequest { repair: false })
        .await
        .unwrap()
        .into_inner();
    assert!(clean.consistent && clean.findings.is_empty(), "{clean:?}");

    // An orphan and an object destroyed behind cowsnap's back.
    d.create_foreign_object("active", 4242);
    let gone = inspect(&mut a, "gone").await.unwrap().id;
    d.destroy_object("active", gone, false);
    let found = a
        .check(pb::CheckRequest { repair: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!found.consistent);
    let kinds: Vec<_> = found
        .findings
        .iter()
        .map(|f| (f.kind.as_str(), f.repaired))
        .collect();
    assert!(kinds.contains(&("orphan_object", false)), "{kinds:?}");
    assert!(kinds.contains(&("missing_object", false)), "{kinds:?}");
    assert!(
        d.object_exists("active", 4242),
        "a check without repair changes nothing"
    );

    let repaired = a
        .check(pb::CheckRequest { repair: true })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !d.object_exists("active", 4242),
        "repair destroyed the orphan"
    );
    let missing = repaired
        .findings
        .iter()
        .find(|f| f.kind == "missing_object")
        .unwrap();
    assert!(
        !missing.repaired,
        "a missing object is reported, never silently dropped"
    );
    assert_eq!(missing.key, "gone");
    // containerd's GC can still remove it.
    remove(&mut c, "gone").await.unwrap();
    let after = a
        .check(pb::CheckRequest { repair: false })
        .await
        .unwrap()
        .into_inner();
    assert!(after.consistent, "{after:?}");
}
