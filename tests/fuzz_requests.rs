//! Fuzzing request handling over the real socket: random sequences of calls
//! with hostile keys, names, parents, labels, field paths and filters, and
//! arbitrary bytes sent as the request message of every method.
//!
//! Properties: every answer is one of the documented codes (Internal only
//! for a message protobuf cannot decode), every mount is inside the root,
//! the daemon never dies or panics, and at the end nothing exists outside
//! the root and metadata and filesystem agree.
//!
//! The corpus `tests/corpus/requests.jsonl` pins raw request messages and
//! their codes; failing generated cases are saved in
//! `tests/corpus/fuzz_requests.regressions` (commit that file) and replayed
//! first. `PROPTEST_CASES` sets the number of cases (default 64, scaled by
//! `COWSNAP_TEST_SCALE`).
//! Run as root (the fixture makes a loop device).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use cowsnap::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const METHODS: &[&str] = &[
    "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage", "Cleanup",
];

async fn raw_call(ch: &Channel, method: &str, body: Vec<u8>) -> Result<(), tonic::Status> {
    raw::unary(ch, method, body).await.map(drop)
}

/// One call of a generated sequence.
#[derive(Debug, Clone)]
enum Op {
    Prepare(String, String, Vec<(String, String)>),
    View(String, String),
    Commit(String, String, Vec<(String, String)>),
    Remove(String),
    Stat(String),
    Mounts(String),
    Usage(String),
    Update(String, Vec<(String, String)>, Vec<String>),
    List(Vec<String>),
    Cleanup,
    Raw(&'static str, Vec<u8>),
}

/// Keys from a small set (so calls meet each other) plus hostile ones.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_owned),
        4 => prop::sample::select(vec![
            "base", "", "..", ".", "/", "../../etc/x", "/abs", "a/b",
            "\0", "x\0y", "é", "😀", " ", "\n", "active/1", "committed", "1", "%s%n",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
        1 => (0usize..3).prop_map(|i| ["k".repeat(4096), "k".repeat(4097), "k".repeat(70_000)][i].clone()),
    ]
}

/// Parents: mostly none or the committed base, sometimes anything.
fn parent() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        3 => Just("base".to_owned()),
        1 => prop::sample::select(vec!["n", "m"]).prop_map(str::to_owned),
        2 => key(),
    ]
}

/// Commit names: mostly two fixed ones (later calls use them as parents).
fn commit_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["n", "m"]).prop_map(str::to_owned),
        1 => key(),
    ]
}

fn label_list() -> impl Strategy<Value = Vec<(String, String)>> {
    let value = prop_oneof![
        3 => "[a-z]{0,8}",
        1 => (4000usize..4200).prop_map(|n| "v".repeat(n)),
        1 => any::<String>(),
    ];
    prop::collection::vec((prop_oneof!["[a-z.]{0,6}", any::<String>()], value), 0..4)
}

fn paths() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(vec![
            "labels",
            "labels.a",
            "labels.",
            "labels.b.c",
            "kind",
            "name",
            "parent",
            "created_at",
            "updated_at",
            "",
            "labels\0",
            "x.y",
        ])
        .prop_map(str::to_owned),
        0..3,
    )
}

fn filters() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(vec![
                "",
                "name==a",
                "kind==active",
                "labels.a",
                "name~=^a",
                "name==",
                ",",
                "name~=[",
                "labels.\"a.b\"!=x",
                "parent==base,kind==view",
            ])
            .prop_map(str::to_owned),
            any::<String>(),
        ],
        0..3,
    )
}

fn raw_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        // A field 2 (the key of most requests) with arbitrary bytes.
        prop::collection::vec(any::<u8>(), 0..32).prop_map(|b| {
            let mut v = vec![0x12, b.len() as u8];
            v.extend(b);
            v
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), parent(), label_list()).prop_map(|(k, p, l)| Op::Prepare(k, p, l)),
        2 => (key(), parent()).prop_map(|(k, p)| Op::View(k, p)),
        3 => (commit_name(), key(), prop_oneof![3 => Just(vec![]), 1 => label_list()])
            .prop_map(|(n, k, l)| Op::Commit(n, k, l)),
        2 => key().prop_map(Op::Remove),
        1 => key().prop_map(Op::Stat),
        1 => key().prop_map(Op::Mounts),
        1 => key().prop_map(Op::Usage),
        2 => (key(), label_list(), paths()).prop_map(|(k, l, p)| Op::Update(k, l, p)),
        1 => filters().prop_map(Op::List),
        1 => Just(Op::Cleanup),
        2 => (prop::sample::select(METHODS), raw_message()).prop_map(|(m, b)| Op::Raw(m, b)),
    ]
}

fn to_map(l: &[(String, String)]) -> std::collections::HashMap<String, String> {
    l.iter().cloned().collect()
}

/// Runs one call and checks its answer; returns the answer's code.
async fn run_op(
    c: &mut SnapshotsClient<Channel>,
    ch: &Channel,
    inside: &str,
    op: &Op,
) -> Result<Code, String> {
    let check_mounts = |m: &[cowsnap::proto::containerd::types::Mount]| -> Result<(), String> {
        for m in m {
            if !m.source.starts_with(inside) {
                return Err(format!("mount outside the root: {m:?}"));
            }
        }
        Ok(())
    };
    let res: Result<(), tonic::Status> = match op {
        Op::Prepare(k, p, l) => c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: String::new(),
                key: k.clone(),
                parent: p.clone(),
                labels: to_map(l),
            })
            .await
            .map(|r| check_mounts(&r.into_inner().mounts))
            .and_then(|r| r.map_err(tonic::Status::aborted)),
        Op::View(k, p) => view(c, k, p)
            .await
            .and_then(|m| check_mounts(&m).map_err(tonic::Status::aborted)),
        Op::Commit(n, k, l) => c
            .commit(pb::CommitSnapshotRequest {
                snapshotter: String::new(),
                name: n.clone(),
                key: k.clone(),
                labels: to_map(l),
                parent: String::new(),
            })
            .await
            .map(drop),
        Op::Remove(k) => remove(c, k).await,
        Op::Stat(k) => stat(c, k).await.map(drop),
        Op::Mounts(k) => c
            .mounts(pb::MountsRequest {
                snapshotter: String::new(),
                key: k.clone(),
            })
            .await
            .and_then(|r| check_mounts(&r.into_inner().mounts).map_err(tonic::Status::aborted)),
        Op::Usage(k) => usage(c, k).await.map(drop),
        Op::Update(k, l, p) => c
            .update(pb::UpdateSnapshotRequest {
                snapshotter: String::new(),
                info: Some(pb::Info {
                    name: k.clone(),
                    labels: to_map(l),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: p.clone() }),
            })
            .await
            .map(drop),
        Op::List(f) => {
            let f: Vec<&str> = f.iter().map(String::as_str).collect();
            list(c, &f).await.map(drop)
        }
        Op::Cleanup => cleanup(c).await,
        Op::Raw(m, b) => raw_call(ch, m, b.clone()).await,
    };
    match res {
        Ok(()) => Ok(Code::Ok),
        Err(e) => {
            let ok = match e.code() {
                Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::InvalidArgument => true,
                // prost refused the message (invalid UTF-8, bad wire data).
                Code::Internal => e.message().contains("decod") || e.message().contains("UTF-8"),
                _ => false,
            };
            if ok {
                Ok(e.code())
            } else {
                Err(format!("{op:?}: {:?}: {}", e.code(), e.message()))
            }
        }
    }
}

/// Removes every snapshot, children first.
async fn reset(c: &mut SnapshotsClient<Channel>) {
    for _ in 0..10 {
        let all = list(c, &[]).await.expect("list");
        if all.is_empty() {
            return;
        }
        for i in all
            .iter()
            .filter(|i| !all.iter().any(|j| j.parent == i.name))
        {
            remove(c, &i.name).await.expect("remove leaf");
        }
    }
    panic!("could not empty the daemon");
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn corpus_requests_get_their_recorded_codes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut d = rt.block_on(Daemon::start());
    let (mut c, ch) = rt.block_on(connect(&d));
    rt.block_on(async {
        prepare(&mut c, "base-x", "").await.unwrap();
        commit(&mut c, "base", "base-x").await.unwrap();
    });
    let corpus = include_str!("corpus/requests.jsonl");
    let mut n = 0;
    for (i, line) in corpus.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("line {}: {err}", i + 1));
        let method = e["method"].as_str().expect("method");
        let hex = e["hex"].as_str().expect("hex");
        let want = e["code"].as_str().expect("code");
        let body: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).expect("hex"))
            .collect();
        let got = rt.block_on(raw_call(&ch, method, body));
        let got = match got {
            Ok(()) => "Ok".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        assert_eq!(got, want, "line {}: {method} {hex}", i + 1);
        assert!(d.is_running(), "line {}: the daemon died", i + 1);
        n += 1;
    }
    assert!(n >= 10, "corpus has {n} entries");
    drop((c, ch));
    assert!(d.stop());
    assert!(d.inventory().is_clean());
}

async fn connect(d: &Daemon) -> (SnapshotsClient<Channel>, Channel) {
    let socket = d.socket.clone();
    let ch = Endpoint::from_static("http://cowsnap.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = socket.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    (d.client().await, ch)
}

#[test]
fn random_call_sequences_get_documented_answers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut d = rt.block_on(Daemon::start());
    let (c, ch) = rt.block_on(connect(&d));
    let root: PathBuf = d.root.clone();
    // Every mount's source is below the root (btrfs: a subvolume's path) or
    // the daemon's dataset (ZFS: a dataset's name).
    let inside = match d.zfs_dataset() {
        Some(dataset) => format!("{dataset}/"),
        None => format!("{}/", root.display()),
    };
    let fs_top = names(d.fs.path());
    let root_names = names(&d.root);
    // Scaled where every call is a few zfs commands under emulation.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(scaled(64, 8) as u32);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/corpus/fuzz_requests.regressions",
        ))),
        // Each case talks to the daemon; shrinking stays affordable.
        max_shrink_iters: 200,
        ..Config::default()
    });
    let tally = Mutex::new(std::collections::BTreeMap::<String, u64>::new());
    let c = Mutex::new(c);
    let result = runner.run(&prop::collection::vec(op(), 1..12), |ops| {
        let mut c = c.lock().unwrap();
        rt.block_on(async {
            reset(&mut c).await;
            prepare(&mut c, "base-x", "").await.unwrap();
            commit(&mut c, "base", "base-x").await.unwrap();
            for op in &ops {
                let code = run_op(&mut c, &ch, &inside, op)
                    .await
                    .map_err(TestCaseError::fail)?;
                let kind = format!("{op:?}");
                let kind = kind.split('(').next().unwrap_or("?").to_owned();
                *tally
                    .lock()
                    .unwrap()
                    .entry(format!("{kind} {code:?}"))
                    .or_default() += 1;
            }
            Ok::<(), TestCaseError>(())
        })?;
        prop_assert!(
            names(root.parent().unwrap()) == fs_top,
            "something appeared beside the root"
        );
        Ok(())
    });
    let summary: Vec<String> = tally
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "fuzz_requests: {cases} cases: {}",
        summary.join(" ")
    );
    if let Err(e) = result {
        panic!("{e}\n--- log tail ---\n{}", {
            let log = d.log_text();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        });
    }
    assert!(d.is_running());
    assert!(!d.log_text().contains("panicked"), "the daemon panicked");
    assert_eq!(names(&d.root), root_names, "nothing new in the root itself");
    drop((c, ch));
    assert!(d.stop());
    let inv = d.inventory();
    assert!(inv.is_clean(), "{inv:#?}");
}
