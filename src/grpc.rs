//! The gRPC adapter: containerd's `containerd.services.snapshots.v1.Snapshots`
//! service over the [`Snapshotter`] core.
//!
//! Each call converts its request, runs the (blocking) core operation on
//! tokio's blocking pool, and converts the result. Errors become a gRPC
//! status in [`status`] and nowhere else. A call whose client goes away
//! still runs to its end, so no operation is left half done.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::error::{Code, Error, Result};
use crate::model::{Info, Kind, Labels, Mount, Timestamp};
use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::types as pbtypes;
use crate::snapshotter::Snapshotter;

pub use pb::snapshots_server::SnapshotsServer;

/// How many snapshots one List response message carries.
const LIST_BATCH: usize = 100;

/// The Snapshots service.
#[derive(Clone)]
pub struct SnapshotsService {
    core: Arc<Snapshotter>,
    in_flight: Arc<AtomicUsize>,
}

/// Counts calls being served, so shutdown can wait for them (and only
/// them: containerd keeps idle connections open forever).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SnapshotsService {
    /// Serves `core`.
    pub fn new(core: Arc<Snapshotter>) -> Self {
        SnapshotsService {
            core,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The number of calls being served right now.
    pub fn in_flight(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }

    /// Wraps the service for a tonic server, with message size limits.
    pub fn into_server(self) -> SnapshotsServer<Self> {
        SnapshotsServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        run_blocking(&self.core, &self.in_flight, op, f).await
    }
}

/// Runs a core operation on the blocking pool, counted as in flight, with
/// its outcome logged and its error converted by [`status`].
pub(crate) async fn run_blocking<T: Send + 'static>(
    core: &Arc<Snapshotter>,
    in_flight: &Arc<AtomicUsize>,
    op: &'static str,
    f: impl FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
) -> std::result::Result<T, Status> {
    let core = core.clone();
    let start = Instant::now();
    let in_flight = InFlight::enter(in_flight);
    let out = tokio::task::spawn_blocking(move || {
        let _in_flight = in_flight;
        f(&core)
    })
    .await
    .map_err(|e| Status::internal(format!("{op}: worker failed: {e}")))?;
    let elapsed = start.elapsed();
    crate::metrics::observe_call(op, elapsed, out.as_ref().err().map(Error::code));
    match out {
        Ok(v) => {
            debug!(op, ?elapsed, "ok");
            Ok(v)
        }
        Err(e) => {
            let st = status(op, &e);
            if matches!(
                e.code(),
                Code::Internal | Code::Unavailable | Code::ResourceExhausted
            ) {
                warn!(op, ?elapsed, error = %e, code = ?st.code(), "failed");
            } else {
                // The clipped message: a refusal may quote a huge input.
                debug!(op, ?elapsed, error = st.message(), code = ?st.code(), "refused");
            }
            Err(st)
        }
    }
}

/// Longest status message sent. The message travels in an HTTP/2 header,
/// and an error may quote what the client sent (a 1 MiB filter string, for
/// one): unbounded, it would exceed what clients accept in a header block
/// (16 KiB by default), and the client would see ResourceExhausted instead
/// of the real code.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// The one conversion from a core error to a gRPC status.
pub fn status(op: &str, e: &Error) -> Status {
    let msg = clip_message(format!("{op}: {e}"));
    match e.code() {
        Code::NotFound => Status::not_found(msg),
        Code::AlreadyExists => Status::already_exists(msg),
        Code::FailedPrecondition => Status::failed_precondition(msg),
        Code::InvalidArgument => Status::invalid_argument(msg),
        Code::ResourceExhausted => Status::resource_exhausted(msg),
        Code::Unimplemented => Status::unimplemented(msg),
        Code::Internal => Status::internal(msg),
        Code::Unavailable => Status::unavailable(msg),
    }
}

/// Cuts `msg` to [`MAX_STATUS_MESSAGE`] bytes on a character boundary,
/// saying how long it was.
fn clip_message(mut msg: String) -> String {
    if msg.len() <= MAX_STATUS_MESSAGE {
        return msg;
    }
    let len = msg.len();
    let mut end = MAX_STATUS_MESSAGE - 32;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.truncate(end);
    msg.push_str(&format!("... ({len} bytes)"));
    msg
}

fn labels_from(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

fn mount_to_pb(m: Mount) -> pbtypes::Mount {
    pbtypes::Mount {
        r#type: m.fs_type,
        source: m.source,
        target: String::new(),
        options: m.options,
    }
}

fn kind_to_pb(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn kind_from_pb(k: i32) -> Option<Kind> {
    match pb::Kind::try_from(k).ok()? {
        pb::Kind::View => Some(Kind::View),
        pb::Kind::Active => Some(Kind::Active),
        pb::Kind::Committed => Some(Kind::Committed),
        pb::Kind::Unknown => None,
    }
}

fn ts_to_pb(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos as i32,
    }
}

fn ts_from_pb(t: &prost_types::Timestamp) -> Timestamp {
    Timestamp {
        secs: t.seconds,
        nanos: t.nanos.clamp(0, 999_999_999) as u32,
    }
}

/// Converts core information to the wire message.
pub fn info_to_pb(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: kind_to_pb(i.kind) as i32,
        created_at: Some(ts_to_pb(i.created)),
        updated_at: Some(ts_to_pb(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

fn info_from_pb(i: pb::Info) -> Info {
    let now = Timestamp::now();
    Info {
        kind: kind_from_pb(i.kind).unwrap_or(Kind::Active),
        name: i.name,
        parent: i.parent,
        labels: labels_from(i.labels),
        created: i.created_at.as_ref().map(ts_from_pb).unwrap_or(now),
        updated: i.updated_at.as_ref().map(ts_from_pb).unwrap_or(now),
    }
}

type ListStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .run("prepare", move |c| {
                c.prepare(&r.key, &r.parent, labels_from(r.labels))
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_pb).collect(),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> std::result::Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .run("view", move |c| {
                c.view(&r.key, &r.parent, labels_from(r.labels))
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_pb).collect(),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> std::result::Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let mounts = self.run("mounts", move |c| c.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts.into_iter().map(mount_to_pb).collect(),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run("commit", move |c| {
            c.commit(&r.name, &r.key, labels_from(r.labels), &r.parent)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run("remove", move |c| c.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> std::result::Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = self.run("stat", move |c| c.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_to_pb(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(info) = r.info else {
            return Err(Status::invalid_argument(
                "update: request has no snapshot info",
            ));
        };
        let info = info_from_pb(info);
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.run("update", move |c| c.update(&info, &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_to_pb(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let infos = self.run("list", move |c| c.list(&r.filters)).await?;
        let mut batches = Vec::with_capacity(infos.len() / LIST_BATCH + 1);
        let mut batch = Vec::with_capacity(LIST_BATCH.min(infos.len()));
        for info in infos {
            batch.push(info_to_pb(info));
            if batch.len() == LIST_BATCH {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: std::mem::take(&mut batch),
                }));
            }
        }
        if !batch.is_empty() {
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> std::result::Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let u = self.run("usage", move |c| c.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(u.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<pb::CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let report = self.run("cleanup", |c| c.cleanup()).await?;
        if !report.is_clean() {
            tracing::info!(?report, "cleanup reclaimed leftovers");
        }
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_status_messages_are_clipped_on_a_char_boundary() {
        let e = Error::InvalidArgument(format!("invalid filter {}", "é".repeat(1 << 19)));
        let st = status("list", &e);
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert!(
            st.message().len() <= MAX_STATUS_MESSAGE,
            "{}",
            st.message().len()
        );
        assert!(st.message().ends_with(" bytes)"), "{}", st.message());
        let short = status("stat", &Error::NotFound("snapshot \"a\"".into()));
        assert_eq!(short.message(), "stat: snapshot \"a\": not found");
    }
}
