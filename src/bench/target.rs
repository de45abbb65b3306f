//! The snapshots service the benchmark drives: cowsnap's socket, or
//! containerd's with a snapshotter name and a namespace.

use std::collections::HashMap;
use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use crate::proto::containerd::types::Mount;

/// The gRPC metadata header containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// containerd's garbage collector keeps snapshots with this label;
/// without it (or a lease) it removes committed and active snapshots that
/// nothing references while the workloads still use them.
const GC_ROOT_LABEL: &str = "containerd.io/gc.root";

/// Where to send requests: a socket, the `snapshotter` field of every
/// request (containerd picks the snapshotter by it; cowsnap ignores it) and
/// containerd's namespace (cowsnap ignores it too). Also the command-line
/// arguments of the bench and power-cut tools that name a target.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// The snapshots socket (cowsnap's, or containerd's).
    #[arg(long)]
    pub socket: PathBuf,
    /// Snapshotter name sent in every request (containerd picks the
    /// snapshotter by it; cowsnap ignores it).
    #[arg(long, default_value = "cowsnap")]
    pub snapshotter: String,
    /// containerd namespace (the `containerd-namespace` header); needed
    /// for containerd's socket, ignored by cowsnap's.
    #[arg(long)]
    pub namespace: Option<String>,
}

impl Target {
    /// The target's name in results when none is given: the snapshotter
    /// name, prefixed with `ctrd/` when requests go through containerd.
    pub fn default_label(&self) -> String {
        match &self.namespace {
            Some(_) => format!("ctrd/{}", self.snapshotter),
            None => self.snapshotter.clone(),
        }
    }
}

/// Adds the namespace header to every request.
#[derive(Clone)]
pub struct NamespaceHeader(Option<MetadataValue<Ascii>>);

impl Interceptor for NamespaceHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(ns) = &self.0 {
            req.metadata_mut().insert(NAMESPACE_HEADER, ns.clone());
        }
        Ok(req)
    }
}

/// One connection to the target.
pub struct Conn {
    client: SnapshotsClient<InterceptedService<Channel, NamespaceHeader>>,
    snapshotter: String,
    /// Through containerd: label every created snapshot a GC root.
    gc_root: bool,
}

impl Target {
    /// Opens a new connection (each concurrent client has its own).
    pub async fn connect(&self) -> Result<Conn, String> {
        let header = match &self.namespace {
            Some(ns) => Some(
                ns.parse::<MetadataValue<Ascii>>()
                    .map_err(|e| format!("namespace {ns:?} is not a valid header value: {e}"))?,
            ),
            None => None,
        };
        let channel = crate::client::connect_channel(&self.socket)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.socket.display()))?;
        let client = SnapshotsClient::with_interceptor(channel, NamespaceHeader(header))
            .max_decoding_message_size(64 * 1024 * 1024);
        Ok(Conn {
            client,
            snapshotter: self.snapshotter.clone(),
            gc_root: self.namespace.is_some(),
        })
    }
}

fn status(op: &str, key: &str, s: Status) -> String {
    format!("{op} {key:?}: {:?}: {}", s.code(), s.message())
}

impl Conn {
    fn labels(&self, mut labels: HashMap<String, String>) -> HashMap<String, String> {
        if self.gc_root {
            labels.insert(GC_ROOT_LABEL.into(), "cowsnap-bench".into());
        }
        labels
    }

    /// Prepare: an active snapshot `key` on `parent` ("" for none).
    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, String> {
        let req = pb::PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
            parent: parent.into(),
            labels: self.labels(labels),
        };
        self.client
            .prepare(req)
            .await
            .map(|r| r.into_inner().mounts)
            .map_err(|s| status("Prepare", key, s))
    }

    /// View: a read-only snapshot `key` of `parent`.
    pub async fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, String> {
        let req = pb::ViewSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
            parent: parent.into(),
            labels: self.labels(HashMap::new()),
        };
        self.client
            .view(req)
            .await
            .map(|r| r.into_inner().mounts)
            .map_err(|s| status("View", key, s))
    }

    /// Mounts of `key`.
    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, String> {
        let req = pb::MountsRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
        };
        self.client
            .mounts(req)
            .await
            .map(|r| r.into_inner().mounts)
            .map_err(|s| status("Mounts", key, s))
    }

    /// Commit the active snapshot `key` as `name`.
    pub async fn commit(&mut self, name: &str, key: &str) -> Result<(), String> {
        let req = pb::CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.into(),
            key: key.into(),
            labels: self.labels(HashMap::new()),
            parent: String::new(),
        };
        self.client
            .commit(req)
            .await
            .map(|_| ())
            .map_err(|s| status("Commit", key, s))
    }

    /// Remove `key`.
    pub async fn remove(&mut self, key: &str) -> Result<(), String> {
        let req = pb::RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
        };
        self.client
            .remove(req)
            .await
            .map(|_| ())
            .map_err(|s| status("Remove", key, s))
    }

    /// Stat `key`.
    pub async fn stat(&mut self, key: &str) -> Result<pb::Info, String> {
        let req = pb::StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
        };
        self.client
            .stat(req)
            .await
            .map_err(|s| status("Stat", key, s))?
            .into_inner()
            .info
            .ok_or_else(|| format!("Stat {key:?}: answered without info"))
    }

    /// Usage of `key`: (bytes, inodes).
    pub async fn usage(&mut self, key: &str) -> Result<(i64, i64), String> {
        let req = pb::UsageRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
        };
        self.client
            .usage(req)
            .await
            .map(|r| {
                let u = r.into_inner();
                (u.size, u.inodes)
            })
            .map_err(|s| status("Usage", key, s))
    }

    /// List with `filters` (OR of the filters), reading the whole stream.
    pub async fn list(&mut self, filters: &[String]) -> Result<Vec<pb::Info>, String> {
        let req = pb::ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: filters.to_vec(),
        };
        let what = format!("{filters:?}");
        let mut stream = self
            .client
            .list(req)
            .await
            .map_err(|s| status("List", &what, s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream
            .message()
            .await
            .map_err(|s| status("List (stream)", &what, s))?
        {
            out.extend(batch.info);
        }
        Ok(out)
    }
}
