//! The operator CLI against a real daemon: every command in text and in
//! `--json`, the exit codes, and the error paths (unknown and ambiguous
//! references, no daemon, an inconsistency `check` finds and repairs).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use cowsnap::proto::containerd::services::snapshots::v1 as spb;
use serde_json::Value;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_at(address: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .arg("--address")
        .arg(address)
        .args(args)
        .env_remove("COWSNAP_ADDRESS")
        .output()
        .expect("run cowsnap");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// Runs a command that must succeed and returns its stdout.
fn text(d: &Daemon, args: &[&str]) -> String {
    let r = run_at(&d.socket, args);
    assert_eq!(r.code, 0, "cowsnap {args:?}: {}{}", r.stdout, r.stderr);
    println!("$ cowsnap {}\n{}", args.join(" "), r.stdout);
    r.stdout
}

/// Runs a command with `--json` that must succeed and parses its output.
fn json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = text(d, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cowsnap {all:?}: {e}:\n{out}"))
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect()
}

/// base (committed, 1 MiB, label image=app) <- ctr (active, 2 MiB), v (view).
async fn populate(d: &Daemon) {
    let mut c = d.client().await;
    let dir = mount_dir(&prepare(&mut c, "base-x", "").await.unwrap());
    write_pattern(&dir.join("f"), 1 << 20, 1);
    c.commit(spb::CommitSnapshotRequest {
        name: "base".into(),
        key: "base-x".into(),
        labels: labels(&[("image", "app")]),
        ..Default::default()
    })
    .await
    .unwrap();
    let m = c
        .prepare(spb::PrepareSnapshotRequest {
            key: "ctr".into(),
            parent: "base".into(),
            labels: labels(&[("image", "app"), ("role", "container")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    write_pattern(&mount_dir(&m).join("g"), 2 << 20, 2);
    view(&mut c, "v", "base").await.unwrap();
    d.sync_usage();
}

#[tokio::test]
async fn every_command_answers_in_text_and_json() {
    let d = Daemon::start().await;
    populate(&d).await;

    // status
    let st = text(&d, &["status"]);
    assert!(
        st.contains("Snapshots:  3 (1 active, 1 view, 1 committed)\n"),
        "{st}"
    );
    assert!(st.contains(backend_name()), "{st}");
    let st = json(&d, &["status"]);
    assert_eq!(st["snapshots"], 3);
    assert_eq!(st["address"], d.socket.display().to_string());
    assert_eq!(st["quota_consistent"], true);

    // ls: table, JSON, filters, keys only, usage columns.
    let ls = text(&d, &["ls"]);
    let lines: Vec<&str> = ls.lines().collect();
    assert!(lines[0].starts_with("ID   KEY"), "{ls}");
    assert!(lines[0].ends_with("CREATED   LABELS"), "{ls}");
    assert_eq!(lines.len(), 4, "{ls}");
    assert!(
        lines[2].contains(" ctr ") && lines[2].contains(" base "),
        "{ls}"
    );
    let all = json(&d, &["ls"]);
    assert_eq!(keys(&all["snapshots"]), ["base", "ctr", "v"]);
    let base = &all["snapshots"][0];
    let base_id = base["id"].as_u64().unwrap();
    assert_eq!(base["kind"], "committed");
    assert_eq!(base["parent"], Value::Null);
    assert_eq!(base["labels"]["image"], "app");
    assert_eq!(base["space"], Value::Null, "no space without --usage");
    let ctr_id = all["snapshots"][1]["id"].as_u64().unwrap();
    assert_eq!(all["snapshots"][1]["parent_id"], base_id);
    assert_eq!(text(&d, &["ls", "kind==active", "--quiet"]), "ctr\n");
    assert_eq!(
        text(&d, &["ls", "-q", "kind==view", "labels.role==container"]),
        "ctr\nv\n",
        "filters are OR-ed"
    );
    let with_usage = text(&d, &["ls", "--usage", "--absolute-time"]);
    assert!(
        with_usage
            .lines()
            .next()
            .unwrap()
            .contains("EXCLUSIVE   REFERENCED")
    );
    assert!(
        with_usage.contains("T") && with_usage.contains("Z "),
        "{with_usage}"
    );
    let used = json(&d, &["ls", "--usage", "name==ctr"]);
    assert!(
        used["snapshots"][0]["space"]["exclusive_bytes"]
            .as_u64()
            .unwrap()
            >= 2 << 20
    );
    let bad = run_at(&d.socket, &["ls", "kind=="]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.starts_with("cowsnap: "), "{}", bad.stderr);

    // inspect: by key, by id; children listed.
    let page = text(&d, &["inspect", "base"]);
    assert!(page.contains("Kind:        committed\n"), "{page}");
    assert!(page.contains("Children:    2\n  ctr\n  v\n"), "{page}");
    assert!(page.contains("  image=app\n"), "{page}");
    assert!(page.contains(&format!("committed/{base_id}")), "{page}");
    let doc = json(&d, &["inspect", &ctr_id.to_string()]);
    assert_eq!(doc["key"], "ctr");
    assert_eq!(doc["parent"], "base");
    assert_eq!(doc["child_keys"], serde_json::json!([]));
    assert!(doc["space"]["exclusive_bytes"].as_u64().unwrap() >= 2 << 20);
    assert_eq!(
        json(&d, &["inspect", "base"])["child_keys"],
        serde_json::json!(["ctr", "v"])
    );
    let missing = run_at(&d.socket, &["inspect", "nope"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("\"nope\": not found"),
        "{}",
        missing.stderr
    );
    assert!(missing.stdout.is_empty());

    // tree: base first, its children in id order.
    let tree = text(&d, &["tree"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 3, "{tree}");
    assert!(
        lines[0].starts_with(&format!("{base_id} base [committed, ")),
        "{tree}"
    );
    assert!(
        lines[1].starts_with(&format!("├── {ctr_id} ctr [active, ")),
        "{tree}"
    );
    assert!(
        lines[2].starts_with("└── ") && lines[2].contains(" v [view"),
        "{tree}"
    );
    let nodes = json(&d, &["tree"])["nodes"].clone();
    let depths: Vec<u64> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["depth"].as_u64().unwrap())
        .collect();
    assert_eq!(depths, [0, 1, 1]);
    assert_eq!(keys(&json(&d, &["tree", "ctr"])["nodes"]), ["ctr"]);

    // usage: every grouping; the totals reconcile with the filesystem.
    let report = text(&d, &["usage"]);
    let header = report.lines().next().unwrap();
    assert!(header.starts_with("ID   KEY    KIND "), "{report}");
    assert!(header.contains(" EXCLUSIVE   REFERENCED "), "{report}");
    assert!(header.ends_with(" CHAIN   LIMIT"), "{report}");
    for line in ["Accounted:", "Unaccounted:", "Filesystem:", "Quota:"] {
        assert!(report.contains(line), "{line} in {report}");
    }
    let u = json(&d, &["usage"]);
    let rows = u["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["name"], "ctr", "largest exclusive first");
    let excl = |r: &Value| r["exclusive_bytes"].as_u64().unwrap();
    let sum: u64 = rows.iter().map(excl).sum();
    let fs = &u["filesystem"];
    assert_eq!(fs["accounted_bytes"].as_u64().unwrap(), sum);
    assert_eq!(
        fs["accounted_bytes"].as_u64().unwrap() + fs["unaccounted_bytes"].as_u64().unwrap(),
        fs["used_bytes"].as_u64().unwrap()
    );
    let row = |key: &str| rows.iter().find(|r| r["name"] == key).unwrap().clone();
    assert_eq!(
        row("ctr")["chain_bytes"].as_u64().unwrap(),
        excl(&row("ctr")) + excl(&row("base"))
    );
    let chains = json(&d, &["usage", "--by", "chain"]);
    assert_eq!(chains["sort"], "chain");
    assert_eq!(keys_of_rows(&chains), ["ctr", "v"]);
    assert_eq!(chains["rows"][0]["snapshots"], 2);
    let by_label = json(&d, &["usage", "--by", "label:image"]);
    assert_eq!(by_label["label"], "image");
    assert_eq!(by_label["rows"][0]["name"], "app");
    assert_eq!(by_label["rows"][0]["snapshots"], 2);
    assert_eq!(by_label["rows"][1]["name"], Value::Null);
    let text_by_label = text(&d, &["usage", "--by", "label:image"]);
    assert!(text_by_label.contains("(none)"), "{text_by_label}");
    let by_root = json(&d, &["usage", "--by", "root"]);
    assert_eq!(by_root["rows"].as_array().unwrap().len(), 1);
    assert_eq!(by_root["rows"][0]["snapshots"], 3);
    assert_eq!(excl(&by_root["rows"][0]), sum);
    let top = json(&d, &["usage", "--top", "1", "--sort", "name"]);
    assert_eq!(
        (keys_of_rows(&top), top["rows_total"].as_u64()),
        (vec!["base"], Some(3))
    );
    let top_text = text(&d, &["usage", "--top", "1"]);
    assert!(
        top_text.contains("Shown:        1 of 3 snapshots"),
        "{top_text}"
    );
    assert_eq!(keys_of_rows(&json(&d, &["usage", "--kind", "view"])), ["v"]);
    assert_eq!(run_at(&d.socket, &["usage", "--by", "size"]).code, 2);

    // quota set / clear
    let set = text(&d, &["quota", "set", "ctr", "64M"]);
    assert_eq!(
        set,
        format!("Limit of ctr (id {ctr_id}): 64.0 MiB (67108864 bytes)\n")
    );
    assert_eq!(json(&d, &["inspect", "ctr"])["limit_bytes"], 64 << 20);
    assert_eq!(
        json(&d, &["quota", "set", "ctr", "1G"])["limit_bytes"],
        1 << 30
    );
    assert_eq!(
        json(&d, &["quota", "clear", "ctr"])["limit_bytes"],
        Value::Null
    );
    assert_eq!(
        text(&d, &["quota", "clear", "ctr"]),
        format!("Limit of ctr (id {ctr_id}): none\n")
    );
    let zero = run_at(&d.socket, &["quota", "set", "ctr", "0"]);
    assert_eq!(zero.code, 2, "{}", zero.stderr);
    assert!(zero.stderr.contains("quota clear"), "{}", zero.stderr);

    // check and cleanup on a consistent daemon.
    assert!(text(&d, &["check"]).starts_with("Consistent"));
    let chk = json(&d, &["check"]);
    assert_eq!(
        (
            chk["consistent"].as_bool(),
            chk["findings"].as_array().map(Vec::len)
        ),
        (Some(true), Some(0))
    );
    let cl = text(&d, &["cleanup"]);
    assert!(cl.contains("Orphans destroyed:         0\n"), "{cl}");
    assert_eq!(json(&d, &["cleanup"])["orphans_failed"], 0);
}

fn keys_of_rows(v: &Value) -> Vec<&str> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn check_exits_3_on_an_orphan_until_repaired() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    prepare(&mut c, "keep", "").await.unwrap();
    d.create_foreign_object("active", 4242);

    let found = run_at(&d.socket, &["check"]);
    println!("$ cowsnap check  (exit {})\n{}", found.code, found.stdout);
    assert_eq!(found.code, 3, "{}{}", found.stdout, found.stderr);
    assert!(found.stdout.contains("orphan_object"), "{}", found.stdout);
    assert!(
        found.stdout.contains("cowsnap check --repair"),
        "{}",
        found.stdout
    );
    let found = run_at(&d.socket, &["check", "--json"]);
    assert_eq!(found.code, 3);
    let doc: Value = serde_json::from_str(&found.stdout).unwrap();
    assert_eq!(doc["consistent"], false);
    assert_eq!(doc["findings"][0]["kind"], "orphan_object");
    assert_eq!(doc["findings"][0]["id"], 4242);
    assert!(d.object_exists("active", 4242));

    let repaired = run_at(&d.socket, &["check", "--repair"]);
    println!(
        "$ cowsnap check --repair  (exit {})\n{}",
        repaired.code, repaired.stdout
    );
    assert_eq!(repaired.code, 0, "{}", repaired.stdout);
    assert!(
        repaired.stdout.contains("all repaired"),
        "{}",
        repaired.stdout
    );
    d.create_foreign_object("active", 4242);
    let repaired = run_at(&d.socket, &["check", "--repair", "--json"]);
    assert_eq!(repaired.code, 0, "{}", repaired.stdout);
    let doc: Value = serde_json::from_str(&repaired.stdout).unwrap();
    assert_eq!(doc["repair"], true);
    assert_eq!(doc["findings"][0]["repaired"], true);
    assert!(!d.object_exists("active", 4242));
    assert_eq!(run_at(&d.socket, &["check"]).code, 0);
}

#[tokio::test]
async fn an_ambiguous_id_prefix_lists_the_candidates() {
    let mut d = Daemon::start().await;
    // An object with id 1000 found at startup raises the id counter past
    // it (and is then destroyed as an orphan): the next snapshots are 1001
    // and 1002, and "100" is the prefix of both but no id itself.
    d.skip_ids_to(1001).await;
    let mut c = d.client().await;
    prepare(&mut c, "a", "").await.unwrap();
    prepare(&mut c, "b", "").await.unwrap();
    let ids = json(&d, &["ls"])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect::<Vec<_>>();
    assert!(
        ids.iter().all(|id| id.to_string().starts_with("100")),
        "{ids:?}"
    );

    let r = run_at(&d.socket, &["inspect", "100"]);
    println!("$ cowsnap inspect 100  (exit {})\n{}", r.code, r.stderr);
    assert_eq!(r.code, 1);
    assert!(r.stdout.is_empty());
    assert!(r.stderr.contains("ambiguous"), "{}", r.stderr);
    for (id, key) in ids.iter().zip(["a", "b"]) {
        assert!(
            r.stderr.contains(&format!("{id} (\"{key}\")")),
            "{}",
            r.stderr
        );
    }
    let one = &ids[1].to_string();
    assert_eq!(json(&d, &["inspect", one])["key"], "b");
    assert_eq!(run_at(&d.socket, &["tree", "100"]).code, 1);
    assert_eq!(run_at(&d.socket, &["quota", "set", "100", "1M"]).code, 1);
}

#[test]
fn no_daemon_is_an_error_naming_the_socket() {
    let socket = Path::new("/nonexistent/cowsnap.sock");
    let r = run_at(socket, &["status"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr
            .contains("cannot connect to the cowsnap daemon at /nonexistent/cowsnap.sock"),
        "{}",
        r.stderr
    );
    // The environment names the socket when --address does not.
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(["ls", "--json"])
        .env("COWSNAP_ADDRESS", "/nonexistent/env.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/env.sock"));
}

#[test]
fn every_command_has_help_and_completions_are_generated() {
    let nowhere = Path::new("/nonexistent/cowsnap.sock");
    for cmd in [
        &["--help"][..],
        &["status", "--help"],
        &["ls", "--help"],
        &["inspect", "--help"],
        &["tree", "--help"],
        &["usage", "--help"],
        &["check", "--help"],
        &["cleanup", "--help"],
        &["quota", "--help"],
        &["quota", "set", "--help"],
        &["quota", "clear", "--help"],
        &["completions", "--help"],
        &["serve", "--help"],
    ] {
        let r = run_at(nowhere, cmd);
        assert_eq!(r.code, 0, "{cmd:?}: {}", r.stderr);
        assert!(r.stdout.contains("Usage: cowsnap"), "{cmd:?}: {}", r.stdout);
    }
    assert!(
        run_at(nowhere, &["usage", "--help"])
            .stdout
            .contains("CHAIN       EXCLUSIVE of the snapshot plus all its ancestors")
    );
    for shell in ["bash", "zsh", "fish"] {
        let r = run_at(nowhere, &["completions", shell]);
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        assert!(
            r.stdout.contains("usage") && r.stdout.contains("inspect"),
            "{shell}"
        );
    }
}

/// Measurement, not a check (run it with `cargo test --test cli
/// ten_thousand -- --ignored --nocapture`): 50 images of 10 committed
/// layers and 9 500 containers on them, then the wall time of the real
/// binary (process start, the daemon's Usage call, grouping, printing).
#[tokio::test]
#[ignore = "slow measurement: creates 10 000 snapshots"]
async fn ten_thousand_snapshots_usage_timing() {
    let d = Daemon::start().await;
    let start = std::time::Instant::now();
    let mut c = d.client().await;
    let mut tops = Vec::new();
    for image in 0..50 {
        let mut parent = String::new();
        for layer in 0..10 {
            let name = format!("img{image}-l{layer}");
            prepare(&mut c, &format!("{name}-x"), &parent)
                .await
                .unwrap();
            c.commit(spb::CommitSnapshotRequest {
                name: name.clone(),
                key: format!("{name}-x"),
                labels: labels(&[("image", &format!("img{image}"))]),
                ..Default::default()
            })
            .await
            .unwrap();
            parent = name;
        }
        tops.push(parent);
    }
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let mut c = d.client().await;
        let tops = tops.clone();
        tasks.push(tokio::spawn(async move {
            for i in (worker..9_500).step_by(4) {
                prepare(&mut c, &format!("ctr{i}"), &tops[i % tops.len()])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!("created 10 000 snapshots in {:?}", start.elapsed());
    // Where the time goes: the Usage call as a client sees it (daemon work,
    // transfer, decoding), then the CLI's grouping alone.
    let channel = cowsnap::client::connect_channel(&d.socket).await.unwrap();
    let mut admin = cowsnap::proto::cowsnap::admin::v1::admin_client::AdminClient::new(channel)
        .max_decoding_message_size(256 << 20);
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let answer = admin
            .usage(cowsnap::proto::cowsnap::admin::v1::UsageRequest {})
            .await
            .unwrap()
            .into_inner();
        let rpc = t.elapsed();
        let t = std::time::Instant::now();
        let query = cowsnap::cli::usage::UsageQuery {
            by: cowsnap::cli::usage::GroupBy::Snapshot,
            sort: None,
            top: None,
            kind: None,
        };
        let table = cowsnap::cli::usage::compute(&answer.snapshots, &query);
        let computed = t.elapsed();
        let fs = answer.filesystem.unwrap_or_default();
        let text = cowsnap::cli::usage::render(&table, answer.snapshots.len(), &fs);
        println!(
            "Usage call {rpc:?} for {} snapshots; grouping {computed:?}, grouping + table {:?} ({} bytes)",
            answer.snapshots.len(),
            t.elapsed(),
            text.len()
        );
    }
    for args in [
        &["usage"][..],
        &["usage", "--json"],
        &["usage", "--top", "10"],
        &["usage", "--by", "chain", "--top", "10"],
        &["usage", "--by", "label:image"],
        &["usage", "--by", "root"],
        &["ls"],
        &["tree"],
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let r = run_at(&d.socket, args);
            times.push(t.elapsed());
            assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
            bytes = r.stdout.len();
        }
        times.sort();
        println!(
            "cowsnap {}: median {:?} (min {:?}, max {:?}), {bytes} bytes of output",
            args.join(" "),
            times[2],
            times[0],
            times[4]
        );
    }
    for line in d.log_text().lines().rev().take(40) {
        if line.contains("admin.usage") || line.contains("admin.list") {
            println!("daemon: {line}");
        }
    }
}
