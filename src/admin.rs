//! The admin gRPC adapter: `cowsnap.admin.v1.Admin` over the core's
//! inventory functions (src/inventory.rs). Served on the daemon's socket
//! next to containerd's snapshots service.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tonic::{Request, Response, Status};

use crate::grpc::run_blocking;
use crate::inventory::Detail;
use crate::model::{Kind, Timestamp};
use crate::proto::cowsnap::admin::v1 as pb;
use crate::snapshotter::Snapshotter;

pub use pb::admin_server::AdminServer;

/// The Admin service.
#[derive(Clone)]
pub struct AdminService {
    core: Arc<Snapshotter>,
    in_flight: Arc<AtomicUsize>,
}

impl AdminService {
    /// Serves `core`, counting calls in `in_flight` (shared with the
    /// snapshots service so shutdown waits for both).
    pub fn new(core: Arc<Snapshotter>, in_flight: Arc<AtomicUsize>) -> Self {
        AdminService { core, in_flight }
    }

    /// Wraps the service for a tonic server.
    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
            .max_decoding_message_size(4 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024)
    }
}

fn ts(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos as i32,
    }
}

fn kind(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

/// Converts a detail to the wire message.
pub fn snapshot_to_pb(d: Detail) -> pb::Snapshot {
    let r = d.record;
    let committed = r.usage.unwrap_or_default();
    pb::Snapshot {
        id: r.id.0,
        key: d.key,
        kind: kind(r.kind) as i32,
        parent: r.parent.unwrap_or_default(),
        parent_id: r.parent_id.map(|p| p.0).unwrap_or(0),
        labels: r.labels.into_iter().collect(),
        created_at: Some(ts(r.created)),
        updated_at: Some(ts(r.updated)),
        space: d.space.map(|s| pb::Space {
            exclusive_bytes: s.exclusive,
            referenced_bytes: s.referenced,
            inodes: d.inodes.unwrap_or(committed.inodes),
            committed_bytes: committed.size,
        }),
        limit_bytes: r.limit.unwrap_or(0),
        object: d.location,
        native_id: r.object.native,
        children: d.children,
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let (st, backend, root, started) =
            run_blocking(&self.core, &self.in_flight, "admin.status", |c| {
                Ok((
                    c.status()?,
                    c.describe_backend(),
                    c.root().display().to_string(),
                    c.started(),
                ))
            })
            .await?;
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            backend,
            root,
            quota_mode: st.accounting.mode,
            quota_consistent: st.accounting.consistent,
            snapshots: st.active + st.views + st.committed,
            active: st.active,
            views: st.views,
            committed: st.committed,
            started_at: Some(ts(started)),
        }))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let details = run_blocking(&self.core, &self.in_flight, "admin.list", move |c| {
            c.details(&r.filters, r.with_usage)
        })
        .await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: details.into_iter().map(snapshot_to_pb).collect(),
        }))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let r = request.into_inner();
        let d = run_blocking(&self.core, &self.in_flight, "admin.inspect", move |c| {
            c.inspect(&r.r#ref)
        })
        .await?;
        Ok(Response::new(snapshot_to_pb(d)))
    }

    async fn usage(
        &self,
        _: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let report = run_blocking(&self.core, &self.in_flight, "admin.usage", |c| {
            c.usage_report()
        })
        .await?;
        let fs = report.filesystem;
        Ok(Response::new(pb::UsageResponse {
            filesystem: Some(pb::FilesystemSpace {
                total_bytes: fs.total,
                used_bytes: fs.used,
                accounted_bytes: report.accounted,
                unaccounted_bytes: fs.used.saturating_sub(report.accounted),
                quota_mode: report.accounting.mode,
                quota_consistent: report.accounting.consistent,
            }),
            snapshots: report.snapshots.into_iter().map(snapshot_to_pb).collect(),
        }))
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let repair = request.into_inner().repair;
        let findings = run_blocking(&self.core, &self.in_flight, "admin.check", move |c| {
            c.check(repair)
        })
        .await?;
        let consistent = findings.iter().all(|f| f.repaired);
        Ok(Response::new(pb::CheckResponse {
            consistent,
            findings: findings
                .into_iter()
                .map(|f| pb::Finding {
                    kind: f.kind.into(),
                    id: f.id,
                    key: f.key,
                    detail: f.detail,
                    repaired: f.repaired,
                })
                .collect(),
        }))
    }

    async fn cleanup(
        &self,
        _: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        let report = run_blocking(&self.core, &self.in_flight, "admin.cleanup", |c| {
            c.cleanup()
        })
        .await?;
        Ok(Response::new(pb::CleanupResponse {
            orphans_destroyed: report.orphans_destroyed,
            orphans_failed: report.orphans_failed,
            stale_accounting_removed: report.stale_accounting_removed,
            reclaimed_bytes: report.reclaimed_bytes,
        }))
    }

    async fn set_quota(
        &self,
        request: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let r = request.into_inner();
        let limit = (r.limit_bytes > 0).then_some(r.limit_bytes);
        let d = run_blocking(&self.core, &self.in_flight, "admin.set_quota", move |c| {
            c.set_quota(&r.r#ref, limit)
        })
        .await?;
        Ok(Response::new(snapshot_to_pb(d)))
    }

    type ExportStream = crate::transfer::server::ExportStream;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let stream = crate::transfer::server::export_stream(
            self.core.clone(),
            self.in_flight.clone(),
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn import(
        &self,
        request: Request<tonic::Streaming<pb::ImportChunk>>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let d = crate::transfer::server::import_stream(
            self.core.clone(),
            self.in_flight.clone(),
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(snapshot_to_pb(d)))
    }
}
