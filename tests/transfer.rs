//! Export and import between real daemons on separate btrfs filesystems
//! (or separate ZFS datasets, with `COWSNAP_TEST_BACKEND=zfs`): round trips
//! compared byte for byte (contents, modes, owners, xattrs, hard links,
//! symlinks, devices, mtimes), chains with deletions, the btrfs-send fast
//! path (full and incremental; btrfs only: on ZFS its refusal is checked),
//! and refusals that leave nothing behind.

mod common;
#[path = "transfer/tree.rs"]
mod tree;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use cowsnap::proto::containerd::services::snapshots::v1 as spb;
use cowsnap::proto::cowsnap::admin::v1 as pb;
use cowsnap::transfer::client::{connect, export_to, import_from};
use cowsnap::transfer::progress::Progress;
use tonic::Code;

/// Commits a new snapshot `name` on `parent` after `fill` wrote its tree.
async fn layer(
    d: &Daemon,
    name: &str,
    parent: &str,
    labels: &[(&str, &str)],
    fill: impl FnOnce(&Path),
) {
    let mut c = d.client().await;
    let key = format!("{name}-active");
    let dir = mount_dir(&prepare(&mut c, &key, parent).await.unwrap());
    fill(&dir);
    c.commit(spb::CommitSnapshotRequest {
        snapshotter: "cowsnap".into(),
        name: name.into(),
        key,
        labels: common::labels(labels),
        parent: String::new(),
    })
    .await
    .unwrap();
}

/// The tree of committed snapshot `name`, through a view.
async fn tree_of(d: &Daemon, name: &str) -> PathBuf {
    let mut c = d.client().await;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let key = format!("look-{name}-{n}");
    mount_dir(&view(&mut c, &key, name).await.unwrap())
}

/// Runs the cowsnap command against `d`; returns stdout, panics on failure.
fn cli(d: &Daemon, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .arg("--address")
        .arg(&d.socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cowsnap {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    assert!(
        out.stderr.is_empty(),
        "no progress off a terminal: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn request(r: &str) -> pb::ExportRequest {
    pb::ExportRequest {
        r#ref: r.into(),
        ..Default::default()
    }
}

async fn export_bytes(d: &Daemon, req: pb::ExportRequest) -> Result<Vec<u8>, tonic::Status> {
    let mut a = connect(&d.socket).await.unwrap();
    let mut out = Vec::new();
    match export_to(&mut a, req, &mut out, &Progress::new("test", None)).await {
        Ok(_) => Ok(out),
        Err(cowsnap::transfer::client::TransferError::Status(s)) => Err(s),
        Err(e) => panic!("{e}"),
    }
}

async fn import_bytes(
    d: &Daemon,
    bytes: Vec<u8>,
    key: Option<&str>,
) -> Result<pb::Snapshot, tonic::Status> {
    let mut a = connect(&d.socket).await.unwrap();
    let input = Box::new(std::io::Cursor::new(bytes));
    match import_from(
        &mut a,
        input,
        key.map(str::to_owned),
        &Progress::new("test", None),
    )
    .await
    {
        Ok(s) => Ok(s),
        Err(cowsnap::transfer::client::TransferError::Status(s)) => Err(s),
        Err(e) => panic!("{e}"),
    }
}

/// Every key, in order.
async fn keys(d: &Daemon) -> Vec<String> {
    let mut c = d.client().await;
    list(&mut c, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect()
}

/// Asserts the daemon holds no transfer leftovers: no temporary keys, no
/// staging directory content, and the admin check finds nothing.
async fn assert_clean(d: &Daemon) {
    let leftovers: Vec<String> = keys(d)
        .await
        .into_iter()
        .filter(|k| k.starts_with("cowsnap.export/") || k.starts_with("cowsnap.import/"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary snapshots left: {leftovers:?}"
    );
    let staging = d.root.join("staging");
    if staging.exists() {
        let left: Vec<_> = std::fs::read_dir(&staging).unwrap().collect();
        assert!(left.is_empty(), "staging left: {left:?}");
    }
    let channel = cowsnap::client::connect_channel(&d.socket).await.unwrap();
    let mut a = pb::admin_client::AdminClient::new(channel);
    let check = a
        .check(pb::CheckRequest { repair: false })
        .await
        .unwrap()
        .into_inner();
    assert!(
        check.consistent && check.findings.is_empty(),
        "{:?}",
        check.findings
    );
}

async fn stat_of(d: &Daemon, key: &str) -> spb::Info {
    let mut c = d.client().await;
    stat(&mut c, key).await.unwrap()
}

#[tokio::test]
async fn tar_round_trip_between_daemons_keeps_every_byte_and_attribute() {
    let (d1, d2) = (Daemon::start().await, Daemon::start().await);
    let mut features = tree::Features::default();
    layer(
        &d1,
        "base",
        "",
        &[("a", "1"), ("containerd.io/gc.root", "x")],
        |dir| {
            features = tree::build(dir, true);
        },
    )
    .await;
    eprintln!("optional metadata set: {features:?}");
    let file = d1.fs.path().join("base.tar.zst");
    cli(&d1, &["export", "base", "-o", file.to_str().unwrap()]);
    assert!(!d1.fs.path().join("base.tar.zst.partial").exists());
    let name = cli(&d2, &["import", file.to_str().unwrap()]);
    assert_eq!(name.trim(), "base");

    let (a, b) = (tree_of(&d1, "base").await, tree_of(&d2, "base").await);
    tree::assert_same(&a, &b);
    assert!(
        tree::allocated(&b.join("sparse")) < 16 << 20,
        "holes stay holes"
    );
    let (s1, s2) = (stat_of(&d1, "base").await, stat_of(&d2, "base").await);
    assert_eq!(s1.labels, s2.labels);
    assert_eq!(
        (s2.parent.as_str(), s2.kind),
        ("", spb::Kind::Committed as i32)
    );
    assert_clean(&d1).await;
    assert_clean(&d2).await;
    // The archive is a plain tar that GNU tar lists.
    let listing = Command::new("tar")
        .args(["--zstd", "-tvf"])
        .arg(&file)
        .output()
        .unwrap();
    if listing.status.success() {
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(
            text.contains("cowsnap-export.json") && text.contains("layers/0/hard-a"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn gzip_archive_of_a_child_imports_as_a_self_contained_snapshot() {
    let (d1, d2) = (Daemon::start().await, Daemon::start().await);
    layer(&d1, "base", "", &[], |dir| {
        write_pattern(&dir.join("a"), 3 << 20, 1)
    })
    .await;
    layer(&d1, "child", "base", &[("l", "v")], |dir| {
        std::fs::remove_file(dir.join("a")).unwrap();
        write_pattern(&dir.join("b"), 1 << 20, 2);
    })
    .await;
    let mut req = request("child");
    req.compression = pb::ArchiveCompression::Gzip as i32;
    let bytes = export_bytes(&d1, req).await.unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
    let s = import_bytes(&d2, bytes, Some("restored/child"))
        .await
        .unwrap();
    assert_eq!((s.key.as_str(), s.parent.as_str()), ("restored/child", ""));
    assert_eq!(s.labels.get("l").map(String::as_str), Some("v"));
    tree::assert_same(
        &tree_of(&d1, "child").await,
        &tree_of(&d2, "restored/child").await,
    );
    assert_clean(&d2).await;
}

/// Three layers: the second deletes files, a directory and a hard link's
/// name, renames and rewrites; the third puts other types where things
/// were, adds links and drops an xattr.
async fn three_layers(d: &Daemon) {
    layer(d, "l1", "", &[("layer", "1")], |dir| {
        tree::build(dir, false);
    })
    .await;
    layer(d, "l2", "l1", &[("layer", "2")], |dir| {
        std::fs::remove_file(dir.join("file.txt")).unwrap();
        std::fs::remove_dir_all(dir.join("private")).unwrap();
        std::fs::remove_file(dir.join("owned-dir/hard-b")).unwrap();
        std::fs::write(dir.join("hard-a"), b"rewritten, still linked").unwrap();
        std::fs::rename(dir.join("owned"), dir.join("owned-renamed")).unwrap();
        std::fs::write(dir.join("new.txt"), tree::pattern(4096, 9)).unwrap();
        xattr::set(dir.join("bin"), "user.added", b"2").unwrap();
        std::fs::set_permissions(
            dir.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        tree::set_mtimes(&dir.join("tmp"), 1_700_000_000);
    })
    .await;
    layer(d, "l3", "l2", &[("layer", "3")], |dir| {
        std::fs::write(dir.join("private"), b"a file where a directory was").unwrap();
        std::fs::remove_file(dir.join("link-rel")).unwrap();
        std::fs::create_dir(dir.join("link-rel")).unwrap();
        std::fs::remove_file(dir.join("fifo")).unwrap();
        std::os::unix::fs::symlink("new.txt", dir.join("fifo")).unwrap();
        std::fs::hard_link(dir.join("new.txt"), dir.join("new-link")).unwrap();
        xattr::remove(dir.join("bin"), "user.added").unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("sparse"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 600 << 20).unwrap();
    })
    .await;
}

#[tokio::test]
async fn chain_export_recreates_three_layers_with_deletions() {
    let (d1, d2) = (Daemon::start().await, Daemon::start().await);
    three_layers(&d1).await;
    let file = d1.fs.path().join("chain.tar.zst");
    cli(
        &d1,
        &["export", "l3", "--chain", "-o", file.to_str().unwrap()],
    );
    assert_eq!(cli(&d2, &["import", file.to_str().unwrap()]).trim(), "l3");
    for (name, parent) in [("l1", ""), ("l2", "l1"), ("l3", "l2")] {
        let s = stat_of(&d2, name).await;
        assert_eq!(s.parent, parent, "{name}");
        assert_eq!(s.labels.get("layer").map(String::as_str), Some(&name[1..]));
        tree::assert_same(&tree_of(&d1, name).await, &tree_of(&d2, name).await);
    }
    assert_clean(&d1).await;
    assert_clean(&d2).await;
}

#[tokio::test]
async fn btrfs_send_round_trips_full_incremental_and_chained() {
    // ZFS: export_refuses_active_snapshots_and_bad_options checks that the
    // format is refused there.
    if skip_on_zfs("btrfs send/receive streams") {
        return;
    }
    let (d1, d2, d3) = (
        Daemon::start().await,
        Daemon::start().await,
        Daemon::start().await,
    );
    three_layers(&d1).await;
    let send = |r: &str, incremental: bool, chain: bool| pb::ExportRequest {
        r#ref: r.into(),
        format: pb::ArchiveFormat::BtrfsSend as i32,
        incremental,
        chain,
        ..Default::default()
    };
    // Full stream of l1, then l2 incremental onto it.
    let full = export_bytes(&d1, send("l1", false, false)).await.unwrap();
    import_bytes(&d2, full, None).await.unwrap();
    tree::assert_same(&tree_of(&d1, "l1").await, &tree_of(&d2, "l1").await);
    let incr = export_bytes(&d1, send("l2", true, false)).await.unwrap();
    assert!(
        incr.len() < 1 << 20,
        "incremental stream is small: {}",
        incr.len()
    );
    let s = import_bytes(&d2, incr.clone(), None).await.unwrap();
    assert_eq!(s.parent, "l1");
    tree::assert_same(&tree_of(&d1, "l2").await, &tree_of(&d2, "l2").await);
    // And again from the imported one: l3 onto l2.
    let incr3 = export_bytes(&d1, send("l3", true, false)).await.unwrap();
    import_bytes(&d2, incr3, None).await.unwrap();
    tree::assert_same(&tree_of(&d1, "l3").await, &tree_of(&d2, "l3").await);
    assert_clean(&d2).await;

    // Without the parent, or with a parent of the same name that was not
    // received from the same subvolume: refused, nothing left.
    let e = import_bytes(&d3, incr.clone(), None).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"l1\""), "{}", e.message());
    let tar_l1 = export_bytes(&d1, request("l1")).await.unwrap();
    import_bytes(&d3, tar_l1, None).await.unwrap();
    let e = import_bytes(&d3, incr, None).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_clean(&d3).await;

    // A chain of streams recreates every layer.
    let mut c3 = d3.client().await;
    remove(&mut c3, "l1").await.unwrap();
    let chain = export_bytes(&d1, send("l3", false, true)).await.unwrap();
    import_bytes(&d3, chain, None).await.unwrap();
    for name in ["l1", "l2", "l3"] {
        tree::assert_same(&tree_of(&d1, name).await, &tree_of(&d3, name).await);
    }
    assert_eq!(stat_of(&d3, "l3").await.parent, "l2");
    assert_clean(&d3).await;
}

#[tokio::test]
async fn export_refuses_active_snapshots_and_bad_options() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    layer(&d, "base", "", &[], |dir| {
        write_pattern(&dir.join("a"), 10, 1)
    })
    .await;
    prepare(&mut c, "work", "base").await.unwrap();
    let e = export_bytes(&d, request("work")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("active"), "{}", e.message());
    assert_eq!(
        export_bytes(&d, request("nope")).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut tar_incremental = request("base");
    tar_incremental.incremental = true;
    let e = export_bytes(&d, tar_incremental).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let no_parent = pb::ExportRequest {
        format: pb::ArchiveFormat::BtrfsSend as i32,
        incremental: true,
        ..request("base")
    };
    assert_eq!(
        export_bytes(&d, no_parent).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    if backend_is_zfs() {
        // The btrfs-send format needs btrfs subvolumes: refused, and the
        // view the export made is gone.
        let send = pb::ExportRequest {
            format: pb::ArchiveFormat::BtrfsSend as i32,
            ..request("base")
        };
        let e = export_bytes(&d, send).await.unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
        assert!(e.message().contains("btrfs"), "{}", e.message());
    }
    assert_clean(&d).await;
}

#[tokio::test]
async fn import_refuses_an_existing_name_before_writing_anything() {
    let d = Daemon::start().await;
    layer(&d, "base", "", &[], |dir| {
        write_pattern(&dir.join("a"), 1 << 20, 1)
    })
    .await;
    let bytes = export_bytes(&d, request("base")).await.unwrap();
    let before = keys(&d).await;
    let e = import_bytes(&d, bytes.clone(), None).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(keys(&d).await, before);
    assert_clean(&d).await;
    let s = import_bytes(&d, bytes, Some("copy")).await.unwrap();
    assert_eq!(s.key, "copy");
    tree::assert_same(&tree_of(&d, "base").await, &tree_of(&d, "copy").await);
}

#[tokio::test]
async fn damaged_archives_are_refused_and_leave_nothing_behind() {
    let (d1, d2) = (Daemon::start().await, Daemon::start().await);
    three_layers(&d1).await;
    let tar = export_bytes(
        &d1,
        pb::ExportRequest {
            chain: true,
            ..request("l3")
        },
    )
    .await
    .unwrap();
    // btrfs-send streams exist on btrfs only.
    let send = if backend_is_zfs() {
        say_skipped("on zfs: the damaged btrfs-send cases");
        None
    } else {
        let bytes = export_bytes(
            &d1,
            pb::ExportRequest {
                chain: true,
                format: pb::ArchiveFormat::BtrfsSend as i32,
                ..request("l3")
            },
        )
        .await
        .unwrap();
        Some(bytes)
    };
    let mut garbage = vec![0x28, 0xb5, 0x2f, 0xfd];
    garbage.extend(tree::pattern(100_000, 7));
    let not_tar = zstd::encode_all(&tree::pattern(100_000, 8)[..], 3).unwrap();
    let mut flipped = tar.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("tar cut at 10%", tar[..tar.len() / 10].to_vec()),
        ("tar cut at 60%", tar[..tar.len() * 6 / 10].to_vec()),
        ("tar cut before its end", tar[..tar.len() - 20].to_vec()),
        ("tar with a flipped byte", flipped),
        ("garbage after a zstd magic", garbage),
        ("zstd data that is no tar", not_tar),
        ("plain text", b"hello, this is not an archive".to_vec()),
        ("empty", Vec::new()),
    ];
    if let Some(send) = &send {
        cases.push(("btrfs-send cut at 50%", send[..send.len() / 2].to_vec()));
        cases.push((
            "btrfs-send cut at 95%",
            send[..send.len() * 95 / 100].to_vec(),
        ));
    }
    let before = keys(&d2).await;
    for (what, bytes) in cases {
        let e = import_bytes(&d2, bytes, None).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert_eq!(keys(&d2).await, before, "{what}");
        assert_clean(&d2).await;
    }
    // The intact archives still import.
    import_bytes(&d2, tar, None).await.unwrap();
    tree::assert_same(&tree_of(&d1, "l3").await, &tree_of(&d2, "l3").await);
}

#[tokio::test]
async fn a_client_that_goes_away_mid_export_leaves_no_view() {
    let d = Daemon::start().await;
    layer(&d, "big", "", &[], |dir| {
        for i in 0..64 {
            std::fs::write(dir.join(format!("f{i}")), tree::pattern(1 << 20, i as u8)).unwrap();
        }
    })
    .await;
    let mut a = connect(&d.socket).await.unwrap();
    let mut stream = a.export(request("big")).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    drop(a);
    // Until the export call has ended: its view's record goes before its
    // object is destroyed, which takes a second or more on ZFS under
    // emulation (the check would see an orphan in between).
    let deadline = Instant::now() + Duration::from_secs(60);
    while keys(&d)
        .await
        .iter()
        .any(|k| k.starts_with("cowsnap.export/"))
        || !d.log_text().contains("\"admin.export\"")
    {
        assert!(
            Instant::now() < deadline,
            "export view not removed:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_clean(&d).await;
}

#[tokio::test]
async fn leftovers_of_an_interrupted_transfer_are_swept_by_the_next_one() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    layer(&d, "base", "", &[], |dir| {
        write_pattern(&dir.join("a"), 10, 1)
    })
    .await;
    // What a daemon killed mid-transfer leaves: a view of an export and an
    // active snapshot of an import, tagged with an earlier instance.
    view(&mut c, "cowsnap.export/1.000000000-7-0", "base")
        .await
        .unwrap();
    prepare(&mut c, "cowsnap.import/1.000000000-8-0", "")
        .await
        .unwrap();
    export_bytes(&d, request("base")).await.unwrap();
    assert_clean(&d).await;
    assert_eq!(keys(&d).await, ["base"]);
}

/// Throughput of export and import, tar (zstd) and btrfs-send, for a
/// ~200 MB tree of 1 MiB files and small files. Run with --ignored.
#[tokio::test]
#[ignore]
async fn throughput_of_a_200_mb_tree() {
    let (d1, d2) = (Daemon::start().await, Daemon::start().await);
    let mut bytes = 0u64;
    layer(&d1, "data", "", &[], |dir| {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for i in 0..180 {
            // Half random (incompressible), half a repeating pattern.
            let mut data = Vec::with_capacity(1 << 20);
            while data.len() < 1 << 19 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(&x.to_le_bytes());
            }
            data.extend(tree::pattern(1 << 19, i as u8));
            std::fs::write(dir.join(format!("big{i}")), &data).unwrap();
            bytes += data.len() as u64;
        }
        std::fs::create_dir(dir.join("small")).unwrap();
        for i in 0..5000 {
            let data = tree::pattern(4000, i as u8);
            std::fs::write(dir.join(format!("small/{i}")), &data).unwrap();
            bytes += data.len() as u64;
        }
    })
    .await;
    let mb = bytes as f64 / 1e6;
    for (label, format) in [
        ("tar+zstd", pb::ArchiveFormat::Tar),
        ("btrfs-send+zstd", pb::ArchiveFormat::BtrfsSend),
    ] {
        let req = pb::ExportRequest {
            format: format as i32,
            ..request("data")
        };
        let t = Instant::now();
        let archive = export_bytes(&d1, req).await.unwrap();
        let export = t.elapsed().as_secs_f64();
        let size = archive.len();
        let t = Instant::now();
        import_bytes(&d2, archive, Some(label)).await.unwrap();
        let import = t.elapsed().as_secs_f64();
        eprintln!(
            "{label}: {mb:.0} MB tree, archive {:.0} MB; export {:.1} s ({:.0} MB/s), import {:.1} s ({:.0} MB/s)",
            size as f64 / 1e6,
            export,
            mb / export,
            import,
            mb / import
        );
        tree::assert_same(&tree_of(&d1, "data").await, &tree_of(&d2, label).await);
    }
}
