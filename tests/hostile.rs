//! Hostile and malformed input over the real socket: a table of cases, each
//! with the gRPC code it must get (or, below gRPC, what the connection must
//! do). Afterwards the daemon must still be running, must not have
//! panicked, must not have created anything outside its root (on ZFS:
//! nothing under its parent dataset but its snapshots' datasets), and must
//! serve normally; metadata and filesystem must agree.
//!
//! Non-UTF-8 strings cannot be built with the generated (string-typed)
//! messages, so those cases hand-encode the protobuf and send it with a
//! raw codec; broken gRPC framing is sent as a raw HTTP/2 body through a
//! real HTTP/2 connection; broken HTTP/2 is written byte by byte to the
//! unix socket. Run as root (the fixture makes a loop device).

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use common::*;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use cowsnap::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::Code;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

// ---------------------------------------------------------------------
// Raw protobuf and gRPC plumbing
// ---------------------------------------------------------------------

/// A protobuf length-delimited field (string, bytes, message).
fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, u64::from(tag << 3 | 2));
    varint(&mut out, bytes.len() as u64);
    out.extend_from_slice(bytes);
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A map<string, string> entry (field `tag`) with raw key and value bytes.
fn map_entry(tag: u32, k: &[u8], v: &[u8]) -> Vec<u8> {
    field(tag, &[field(1, k), field(2, v)].concat())
}

/// What a case got.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    /// A gRPC status (Code::Ok for success).
    Grpc(Code),
    /// Below gRPC: the daemon closed the connection; `goaway` is the
    /// HTTP/2 GOAWAY error code it sent first, if any.
    Closed { goaway: Option<u32> },
}

impl std::fmt::Display for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Got::Grpc(c) => write!(f, "{c:?}"),
            Got::Closed { goaway: None } => write!(f, "connection closed"),
            Got::Closed { goaway: Some(e) } => {
                write!(f, "GOAWAY({}) + close", h2_error_name(*e))
            }
        }
    }
}

fn h2_error_name(e: u32) -> &'static str {
    match e {
        0 => "NO_ERROR",
        1 => "PROTOCOL_ERROR",
        2 => "INTERNAL_ERROR",
        3 => "FLOW_CONTROL_ERROR",
        6 => "FRAME_SIZE_ERROR",
        9 => "COMPRESSION_ERROR",
        _ => "other",
    }
}

fn code_of<T>(r: Result<T, tonic::Status>) -> Got {
    Got::Grpc(match r {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    })
}

/// Everything a case may use.
#[derive(Clone)]
struct Ctx {
    c: SnapshotsClient<Channel>,
    ch: Channel,
    socket: PathBuf,
    root: PathBuf,
    /// Where new active snapshots' objects go: a directory in the root
    /// (btrfs) or the active area's dataset (ZFS), with a trailing slash.
    active: String,
}

impl Ctx {
    /// A unary call with hand-encoded request bytes.
    async fn raw_unary(&self, method: &str, body: Vec<u8>) -> Got {
        code_of(raw::unary(&self.ch, method, body).await)
    }

    /// A List call with hand-encoded request bytes.
    async fn raw_list(&self, body: Vec<u8>) -> Got {
        let mut g = tonic::client::Grpc::new(self.ch.clone());
        g.ready().await.expect("ready");
        let path = raw::method_path("List");
        match g
            .server_streaming(tonic::Request::new(body), path, raw::RawCodec)
            .await
        {
            Err(e) => Got::Grpc(e.code()),
            Ok(r) => {
                let mut s = r.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Got::Grpc(Code::Ok),
                        Err(e) => return Got::Grpc(e.code()),
                    }
                }
            }
        }
    }

    /// A request whose HTTP/2 body is `body` verbatim (gRPC framing
    /// included), on a real HTTP/2 connection; returns the grpc-status.
    async fn raw_body(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Got {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://cowsnap.invalid{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(tonic::body::Body::new(body.to_owned()))
            .expect("request");
        let resp = self.ch.clone().oneshot(req).await.expect("http/2 exchange");
        if let Some(st) = tonic::Status::from_header_map(resp.headers()) {
            return Got::Grpc(st.code());
        }
        let http_status = resp.status();
        let mut body = resp.into_body();
        loop {
            let frame = std::future::poll_fn(|cx| {
                tonic::codegen::Body::poll_frame(Pin::new(&mut body), cx)
            })
            .await;
            match frame {
                None => panic!("{path}: no grpc-status (HTTP {http_status})"),
                Some(Err(e)) => return Got::Grpc(e.code()),
                Some(Ok(f)) => {
                    if let Ok(trailers) = f.into_trailers() {
                        let st = tonic::Status::from_header_map(&trailers)
                            .expect("grpc-status in trailers");
                        return Got::Grpc(st.code());
                    }
                }
            }
        }
    }

    /// Writes `bytes` to a fresh connection and reads until the daemon
    /// closes it (bounded); reports any GOAWAY it sent.
    async fn raw_connection(&self, bytes: &[u8], then_close_write: bool) -> Got {
        let mut s = UnixStream::connect(&self.socket).await.expect("connect");
        // The daemon may close before reading everything: ignore EPIPE.
        let _ = s.write_all(bytes).await;
        if then_close_write {
            let _ = s.shutdown().await;
        }
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
        match read {
            Err(_) => panic!("the daemon kept a broken connection open"),
            Ok(_) => Got::Closed {
                goaway: find_goaway(&got),
            },
        }
    }
}

/// The error code of the first GOAWAY frame in a server's byte stream.
fn find_goaway(mut b: &[u8]) -> Option<u32> {
    while b.len() >= 9 {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
        let kind = b[3];
        if b.len() < 9 + len {
            return None;
        }
        let payload = &b[9..9 + len];
        if kind == 7 && payload.len() >= 8 {
            return Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
        b = &b[9 + len..];
    }
    None
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn empty_settings() -> Vec<u8> {
    frame(4, 0, 0, &[])
}

/// A gRPC message frame as text: flag, 4-byte length, payload. Every byte
/// used by the cases is ASCII, so a `String` body carries it verbatim.
fn grpc_frame(flag: u8, declared_len: u32, payload: &str) -> String {
    let mut v = vec![flag];
    v.extend_from_slice(&declared_len.to_be_bytes());
    v.extend_from_slice(payload.as_bytes());
    String::from_utf8(v).expect("ASCII-only frame")
}

/// A StatSnapshotRequest for key `k` (ASCII, < 128 bytes) as text.
fn stat_payload(k: &str) -> String {
    let mut s = String::from("\u{12}");
    s.push(char::from(k.len() as u8));
    s.push_str(k);
    s
}

// ---------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------

type CaseFuture = Pin<Box<dyn Future<Output = Got> + Send>>;

struct Case {
    name: &'static str,
    expect: Expect,
    run: Box<dyn Fn(Ctx) -> CaseFuture>,
}

/// What a case must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This gRPC code.
    Code(Code),
    /// The connection is closed (with or without a GOAWAY first).
    Closed,
}

impl Expect {
    fn accepts(self, got: &Got) -> bool {
        match (self, got) {
            (Expect::Code(c), Got::Grpc(g)) => c == *g,
            (Expect::Closed, Got::Closed { .. }) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Code(c) => write!(f, "{c:?}"),
            Expect::Closed => write!(f, "connection closed"),
        }
    }
}

fn case<F, Fut>(name: &'static str, expect: Code, f: F) -> Case
where
    F: Fn(Ctx) -> Fut + 'static,
    Fut: Future<Output = Got> + Send + 'static,
{
    Case {
        name,
        expect: Expect::Code(expect),
        run: Box::new(move |ctx| Box::pin(f(ctx))),
    }
}

fn conn_case<F, Fut>(name: &'static str, f: F) -> Case
where
    F: Fn(Ctx) -> Fut + 'static,
    Fut: Future<Output = Got> + Send + 'static,
{
    Case {
        name,
        expect: Expect::Closed,
        run: Box::new(move |ctx| Box::pin(f(ctx))),
    }
}

fn prep_req(key: &str, parent: &str, l: &[(&str, &str)]) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: String::new(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(l),
    }
}

fn upd_req(name: &str, l: &[(&str, &str)], paths: &[&str]) -> pb::UpdateSnapshotRequest {
    pb::UpdateSnapshotRequest {
        snapshotter: String::new(),
        info: Some(pb::Info {
            name: name.into(),
            labels: labels(l),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|s| s.to_string()).collect(),
        }),
    }
}

/// Prepare `key` with no parent and check its mount is an object of the
/// active area named by its id (whatever the key), and usable.
async fn prepare_inside_root(mut ctx: Ctx, key: String) -> Got {
    match prepare(&mut ctx.c, &key, "").await {
        Ok(m) => {
            let source = &m[0].source;
            let id = source.strip_prefix(&ctx.active);
            assert!(
                id.is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())),
                "{key:?} -> {source}"
            );
            let dir = mount_dir(&m);
            assert!(dir.is_dir(), "{key:?} -> {}", dir.display());
            assert_eq!(stat(&mut ctx.c, &key).await.unwrap().name, key);
            Got::Grpc(Code::Ok)
        }
        Err(e) => Got::Grpc(e.code()),
    }
}

fn many_labels(n: usize) -> std::collections::HashMap<String, String> {
    (0..n).map(|i| (format!("l{i}"), "v".to_owned())).collect()
}

fn table() -> Vec<Case> {
    use Code::*;
    let big = "k".repeat(64 * 1024);
    vec![
        // Keys: empty, huge, boundary.
        case(
            "prepare with an empty key",
            InvalidArgument,
            |mut x| async move { code_of(prepare(&mut x.c, "", "").await) },
        ),
        case(
            "stat of an empty key",
            InvalidArgument,
            |mut x| async move { code_of(stat(&mut x.c, "").await) },
        ),
        case(
            "commit to an empty name",
            InvalidArgument,
            |mut x| async move { code_of(commit(&mut x.c, "", "active").await) },
        ),
        case("prepare with a 64 KiB key", InvalidArgument, {
            let big = big.clone();
            move |mut x| {
                let big = big.clone();
                async move { code_of(prepare(&mut x.c, &big, "").await) }
            }
        }),
        case("commit to a 64 KiB name", InvalidArgument, {
            let big = big.clone();
            move |mut x| {
                let big = big.clone();
                async move { code_of(commit(&mut x.c, &big, "active").await) }
            }
        }),
        case("remove of a 64 KiB key", InvalidArgument, {
            let big = big.clone();
            move |mut x| {
                let big = big.clone();
                async move { code_of(remove(&mut x.c, &big).await) }
            }
        }),
        case(
            "prepare with a key of 4097 bytes",
            InvalidArgument,
            |mut x| async move { code_of(prepare(&mut x.c, &"k".repeat(4097), "").await) },
        ),
        case(
            "prepare with a key of exactly 4096 bytes",
            Ok,
            |x| async move { prepare_inside_root(x, "b".repeat(4096)).await },
        ),
        // A parent name is checked for length like a key.
        case("prepare with a 64 KiB parent name", InvalidArgument, {
            let big = big.clone();
            move |mut x| {
                let big = big.clone();
                async move { code_of(prepare(&mut x.c, "small", &big).await) }
            }
        }),
        // Non-UTF-8: prost refuses the message before cowsnap sees it.
        case("stat of a non-UTF-8 key", Internal, |x| async move {
            x.raw_unary("Stat", field(2, b"bad\xff\xfekey")).await
        }),
        case("prepare with a non-UTF-8 key", Internal, |x| async move {
            x.raw_unary("Prepare", field(2, b"\xc3\x28")).await
        }),
        case(
            "prepare with a non-UTF-8 label value",
            Internal,
            |x| async move {
                let body = [field(2, b"utf8-key"), map_entry(4, b"k", b"\xff")].concat();
                x.raw_unary("Prepare", body).await
            },
        ),
        case("list with a non-UTF-8 filter", Internal, |x| async move {
            x.raw_list(field(2, b"name==\xff")).await
        }),
        case(
            "stat with a valid hand-encoded key",
            NotFound,
            |x| async move { x.raw_unary("Stat", field(2, b"no-such-key")).await },
        ),
        // Keys that look like paths: names, never paths.
        case("prepare with key ..", Ok, |x| async move {
            prepare_inside_root(x, "..".into()).await
        }),
        case(
            "prepare with key ../../../../etc/cowsnap-evil",
            Ok,
            |x| async move { prepare_inside_root(x, "../../../../etc/cowsnap-evil".into()).await },
        ),
        case("prepare with key /tmp/cowsnap-evil", Ok, |x| async move {
            prepare_inside_root(x, "/tmp/cowsnap-evil".into()).await
        }),
        case("prepare with a key holding NUL", Ok, |x| async move {
            prepare_inside_root(x, "nul\0key\0".into()).await
        }),
        case(
            "prepare with key active/1 (an object's path)",
            Ok,
            |x| async move { prepare_inside_root(x, "active/1".into()).await },
        ),
        case(
            "prepare with the root's own path as key",
            Ok,
            |x| async move {
                let key = format!("{}/committed/1", x.root.display());
                prepare_inside_root(x, key).await
            },
        ),
        case("prepare with key 1 (a decimal id)", Ok, |x| async move {
            prepare_inside_root(x, "1".into()).await
        }),
        case(
            "view with parent ../committed/1",
            NotFound,
            |mut x| async move { code_of(view(&mut x.c, "v-path", "../committed/1").await) },
        ),
        // Labels.
        case(
            "prepare with a label of 4097 bytes",
            InvalidArgument,
            |mut x| async move {
                let v = "v".repeat(4096);
                code_of(x.c.prepare(prep_req("lab1", "", &[("k", &v)])).await)
            },
        ),
        case(
            "prepare with a label of exactly 4096 bytes",
            Ok,
            |mut x| async move {
                let v = "v".repeat(4095);
                code_of(x.c.prepare(prep_req("lab2", "", &[("k", &v)])).await)
            },
        ),
        case(
            "prepare with 1025 labels",
            InvalidArgument,
            |mut x| async move {
                let mut r = prep_req("lab3", "", &[]);
                r.labels = many_labels(1025);
                code_of(x.c.prepare(r).await)
            },
        ),
        case("prepare with 1024 labels", Ok, |mut x| async move {
            let mut r = prep_req("lab4", "", &[]);
            r.labels = many_labels(1024);
            code_of(x.c.prepare(r).await)
        }),
        case(
            "prepare with an empty label key",
            InvalidArgument,
            |mut x| async move { code_of(x.c.prepare(prep_req("lab5", "", &[("", "v")])).await) },
        ),
        case(
            "commit with a label of 4097 bytes",
            InvalidArgument,
            |mut x| async move {
                let v = "v".repeat(4096);
                code_of(
                    x.c.commit(pb::CommitSnapshotRequest {
                        snapshotter: String::new(),
                        name: "lab-commit".into(),
                        key: "active".into(),
                        labels: labels(&[("k", &v)]),
                        parent: String::new(),
                    })
                    .await,
                )
            },
        ),
        case(
            "request over the 16 MiB message limit",
            OutOfRange,
            |x| async move {
                let entry = map_entry(4, b"k", &[b'v'; 4000]);
                let body = [field(2, b"huge-msg"), entry.repeat(4300)].concat();
                x.raw_unary("Prepare", body).await
            },
        ),
        // Parents.
        case(
            "prepare on a missing parent",
            NotFound,
            |mut x| async move { code_of(prepare(&mut x.c, "orphan", "no-such-parent").await) },
        ),
        case(
            "prepare on an active parent",
            InvalidArgument,
            |mut x| async move { code_of(prepare(&mut x.c, "on-active", "active").await) },
        ),
        case("view on a view", InvalidArgument, |mut x| async move {
            code_of(view(&mut x.c, "on-view", "view").await)
        }),
        case(
            "prepare on the key being prepared",
            NotFound,
            |mut x| async move { code_of(prepare(&mut x.c, "self-parent", "self-parent").await) },
        ),
        // Commit.
        case("commit of a view", FailedPrecondition, |mut x| async move {
            code_of(commit(&mut x.c, "from-view", "view").await)
        }),
        case(
            "commit of a committed snapshot",
            FailedPrecondition,
            |mut x| async move { code_of(commit(&mut x.c, "again", "base").await) },
        ),
        case(
            "commit onto an existing name",
            AlreadyExists,
            |mut x| async move { code_of(commit(&mut x.c, "base", "active").await) },
        ),
        case(
            "commit onto its own key",
            AlreadyExists,
            |mut x| async move { code_of(commit(&mut x.c, "active", "active").await) },
        ),
        case("commit of a missing key", NotFound, |mut x| async move {
            code_of(commit(&mut x.c, "ghost-layer", "ghost").await)
        }),
        case(
            "commit onto another parent (rebase)",
            Unimplemented,
            |mut x| async move {
                code_of(
                    x.c.commit(pb::CommitSnapshotRequest {
                        snapshotter: String::new(),
                        name: "rebased".into(),
                        key: "child".into(),
                        labels: Default::default(),
                        parent: "other-base".into(),
                    })
                    .await,
                )
            },
        ),
        // Update.
        case("update without info", InvalidArgument, |mut x| async move {
            code_of(
                x.c.update(pb::UpdateSnapshotRequest {
                    snapshotter: String::new(),
                    info: None,
                    update_mask: None,
                })
                .await,
            )
        }),
        case("update of kind", InvalidArgument, |mut x| async move {
            code_of(x.c.update(upd_req("base", &[], &["kind"])).await)
        }),
        case("update of parent", InvalidArgument, |mut x| async move {
            code_of(x.c.update(upd_req("child", &[], &["parent"])).await)
        }),
        case("update of name", InvalidArgument, |mut x| async move {
            code_of(x.c.update(upd_req("base", &[], &["name"])).await)
        }),
        case(
            "update of created_at",
            InvalidArgument,
            |mut x| async move { code_of(x.c.update(upd_req("base", &[], &["created_at"])).await) },
        ),
        case(
            "update of an unknown path",
            InvalidArgument,
            |mut x| async move { code_of(x.c.update(upd_req("base", &[], &["no.such.path"])).await) },
        ),
        case(
            "update of a missing snapshot",
            NotFound,
            |mut x| async move {
                code_of(
                    x.c.update(upd_req("ghost", &[("a", "b")], &["labels"]))
                        .await,
                )
            },
        ),
        case(
            "update adding a label of 4097 bytes",
            InvalidArgument,
            |mut x| async move {
                let v = "v".repeat(4096);
                code_of(
                    x.c.update(upd_req("base", &[("k", &v)], &["labels.k"]))
                        .await,
                )
            },
        ),
        case(
            "update adding a 1025th label",
            InvalidArgument,
            |mut x| async move {
                let mut r = upd_req("base", &[], &["labels"]);
                r.info.as_mut().unwrap().labels = many_labels(1025);
                code_of(x.c.update(r).await)
            },
        ),
        // List filters.
        case(
            "list with filter name==",
            InvalidArgument,
            |mut x| async move { code_of(list(&mut x.c, &["name=="]).await) },
        ),
        case(
            "list with an unterminated quote",
            InvalidArgument,
            |mut x| async move { code_of(list(&mut x.c, &["labels.\"abc==x"]).await) },
        ),
        case(
            "list with a trailing comma",
            InvalidArgument,
            |mut x| async move { code_of(list(&mut x.c, &["kind==active,"]).await) },
        ),
        case(
            "list with an unknown operator",
            InvalidArgument,
            |mut x| async move { code_of(list(&mut x.c, &["name<>x"]).await) },
        ),
        case(
            "list with 65 distinct regexes",
            InvalidArgument,
            |mut x| async move {
                let f: Vec<String> = (0..65).map(|i| format!("name~=r{i}")).collect();
                let f: Vec<&str> = f.iter().map(String::as_str).collect();
                code_of(list(&mut x.c, &f).await)
            },
        ),
        case(
            "list with a huge regex (compiles to nothing)",
            Ok,
            |mut x| async move { code_of(list(&mut x.c, &["name~=(a{1000}){1000}"]).await) },
        ),
        case(
            "list with a 1 MiB filter",
            InvalidArgument,
            |mut x| async move {
                let f = format!("name=={}", "=".repeat(1 << 20));
                code_of(list(&mut x.c, &[f.as_str()]).await)
            },
        ),
        // Kinds.
        case(
            "mounts of a committed snapshot",
            FailedPrecondition,
            |mut x| async move {
                code_of(
                    x.c.mounts(pb::MountsRequest {
                        snapshotter: String::new(),
                        key: "base".into(),
                    })
                    .await,
                )
            },
        ),
        case("mounts of a missing key", NotFound, |mut x| async move {
            code_of(
                x.c.mounts(pb::MountsRequest {
                    snapshotter: String::new(),
                    key: "ghost".into(),
                })
                .await,
            )
        }),
        case("usage of a view", Ok, |mut x| async move {
            code_of(usage(&mut x.c, "view").await)
        }),
        case("usage of a missing key", NotFound, |mut x| async move {
            code_of(usage(&mut x.c, "ghost").await)
        }),
        case(
            "remove of a parent with children",
            FailedPrecondition,
            |mut x| async move { code_of(remove(&mut x.c, "base").await) },
        ),
        case("remove of a missing key", NotFound, |mut x| async move {
            code_of(remove(&mut x.c, "ghost").await)
        }),
        // gRPC framing, on a valid HTTP/2 connection.
        case("unknown method", Unimplemented, |x| async move {
            x.raw_body(&raw::path("Explode"), &[], &grpc_frame(0, 0, ""))
                .await
        }),
        case("unknown service", Unimplemented, |x| async move {
            x.raw_body("/evil.Service/Stat", &[], &grpc_frame(0, 0, ""))
                .await
        }),
        case("unary call with no message", Internal, |x| async move {
            x.raw_body(&raw::path("Stat"), &[], "").await
        }),
        case(
            "message shorter than its length prefix",
            Internal,
            |x| async move {
                let body = grpc_frame(0, 100, &stat_payload("abc"));
                x.raw_body(&raw::path("Stat"), &[], &body).await
            },
        ),
        case("truncated length prefix", Internal, |x| async move {
            x.raw_body(&raw::path("Stat"), &[], "\0\0\0").await
        }),
        case(
            "compressed flag without grpc-encoding",
            Internal,
            |x| async move {
                let p = stat_payload("abc");
                let body = grpc_frame(1, p.len() as u32, &p);
                x.raw_body(&raw::path("Stat"), &[], &body).await
            },
        ),
        case(
            "gzip-compressed message (not enabled)",
            Unimplemented,
            |x| async move {
                let p = stat_payload("abc");
                let body = grpc_frame(1, p.len() as u32, &p);
                x.raw_body(&raw::path("Stat"), &[("grpc-encoding", "gzip")], &body)
                    .await
            },
        ),
        case("invalid compression flag 2", Internal, |x| async move {
            let p = stat_payload("abc");
            let body = grpc_frame(2, p.len() as u32, &p);
            x.raw_body(&raw::path("Stat"), &[], &body).await
        }),
        case("declared length of 2 GiB", OutOfRange, |x| async move {
            let body = grpc_frame(0, 0x7f7f_7f7f, &stat_payload("abc"));
            x.raw_body(&raw::path("Stat"), &[], &body).await
        }),
        case("two messages in a unary call", NotFound, |x| async move {
            let p = stat_payload("abc");
            let one = grpc_frame(0, p.len() as u32, &p);
            x.raw_body(&raw::path("Stat"), &[], &format!("{one}{one}"))
                .await
        }),
        case(
            "garbage protobuf (bad wire type)",
            Internal,
            |x| async move {
                let body = grpc_frame(0, 4, "\u{7}\u{7}\u{7}\u{7}");
                x.raw_body(&raw::path("Stat"), &[], &body).await
            },
        ),
        case(
            "protobuf with a truncated field",
            Internal,
            |x| async move {
                let body = grpc_frame(0, 2, "\u{12}\u{7f}");
                x.raw_body(&raw::path("Stat"), &[], &body).await
            },
        ),
        case(
            "unknown protobuf fields are ignored",
            NotFound,
            |x| async move {
                let p = format!("{}\u{7a}\u{3}xyz", stat_payload("abc"));
                let body = grpc_frame(0, p.len() as u32, &p);
                x.raw_body(&raw::path("Stat"), &[], &body).await
            },
        ),
        // Broken HTTP/2, byte by byte on the socket.
        conn_case(
            "HTTP/1.1 request instead of the HTTP/2 preface",
            |x| async move {
                x.raw_connection(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false)
                    .await
            },
        ),
        conn_case("4 KiB of garbage", |x| async move {
            let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
            x.raw_connection(&junk, false).await
        }),
        conn_case("preface then junk", |x| async move {
            let b = [PREFACE, b"\xde\xad\xbe\xef not a frame at all \xff\xff\xff"].concat();
            x.raw_connection(&b, false).await
        }),
        conn_case("preface then a frame larger than allowed", |x| async move {
            let mut b = [PREFACE, &empty_settings()].concat();
            // A DATA frame header announcing 16 MiB - 1, over the 16 KiB
            // default maximum frame size.
            b.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]);
            x.raw_connection(&b, false).await
        }),
        conn_case("headers with garbage HPACK", |x| async move {
            let b = [
                PREFACE,
                &empty_settings(),
                &frame(1, 0x5, 1, &[0xff, 0xff, 0xff, 0xff, 0x7f, 0x00]),
            ]
            .concat();
            x.raw_connection(&b, false).await
        }),
        conn_case("data on a stream never opened", |x| async move {
            let b = [PREFACE, &empty_settings(), &frame(0, 1, 7, b"hello")].concat();
            x.raw_connection(&b, false).await
        }),
        conn_case("a frame cut short, then end of stream", |x| async move {
            let mut b = [PREFACE, &empty_settings()].concat();
            b.extend_from_slice(&[0, 0, 100, 1, 4, 0, 0, 0, 1, 0x82, 0x86]);
            x.raw_connection(&b, true).await
        }),
        conn_case("preface cut short, then end of stream", |x| async move {
            x.raw_connection(&PREFACE[..10], true).await
        }),
    ]
}

/// Names directly under `dir`.
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_table() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    // The state the cases refer to.
    prepare(&mut c, "base-x", "").await.unwrap();
    commit(&mut c, "base", "base-x").await.unwrap();
    prepare(&mut c, "active", "").await.unwrap();
    prepare(&mut c, "child", "base").await.unwrap();
    view(&mut c, "view", "base").await.unwrap();
    let fs_top_before = names(d.fs.path());
    let root_before = names(&d.root);

    let socket = d.socket.clone();
    let ch = Endpoint::from_static("http://cowsnap.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = socket.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    let ctx = Ctx {
        c: c.clone(),
        ch,
        socket: d.socket.clone(),
        root: d.root.clone(),
        active: d.area_prefix("active"),
    };

    let cases = table();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(30), (case.run)(ctx.clone()))
            .await
            .unwrap_or_else(|_| panic!("case {}: {} hung", i + 1, case.name));
        let ok = case.expect.accepts(&got);
        rows.push(format!(
            "| {:>2} | {:<52} | {:<18} | {:<30} | {}",
            i + 1,
            case.name,
            case.expect.to_string(),
            got.to_string(),
            if ok { "ok" } else { "FAIL" }
        ));
        if !ok {
            failures.push(format!(
                "{}: expected {}, got {got}",
                case.name, case.expect
            ));
        }
        assert!(d.is_running(), "the daemon died on case {}", case.name);
    }
    let table = rows.join("\n");
    let _ = writeln!(
        std::io::stderr(),
        "hostile input: {} cases, {} as expected\n{table}",
        cases.len(),
        cases.len() - failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(cases.len() >= 30);

    // Still running, never panicked, nothing outside the root.
    assert!(d.is_running());
    let log = d.log_text();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    assert_eq!(
        names(d.fs.path()),
        fs_top_before,
        "nothing new beside the root"
    );
    assert_eq!(
        names(&d.root),
        root_before,
        "nothing new in the root itself"
    );
    for p in ["/etc/cowsnap-evil", "/tmp/cowsnap-evil"] {
        assert!(!Path::new(p).exists(), "{p} was created");
    }

    // Serves normally.
    let dir = mount_dir(&prepare(&mut c, "after-x", "base").await.unwrap());
    write_pattern(&dir.join("f"), 4096, 5);
    commit(&mut c, "after", "after-x").await.unwrap();
    let v = mount_dir(&view(&mut c, "after-v", "after").await.unwrap());
    assert!(has_pattern(&v.join("f"), 4096, 5));
    cleanup(&mut c).await.unwrap();
    assert!(list(&mut c, &[]).await.unwrap().len() >= 10);
    drop((c, ctx));
    assert!(d.stop(), "clean stop:\n{}", d.log_text());
    let inv = d.inventory();
    assert!(inv.is_clean(), "{inv:#?}");
}
