//! A client for a snapshots socket (cowsnap's, or any containerd snapshots
//! service), used by the tests, the benchmarks and the command-line tools.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;

/// Connects to the snapshots service on the unix socket at `path`.
pub async fn connect(path: &Path) -> Result<SnapshotsClient<Channel>, tonic::transport::Error> {
    Ok(SnapshotsClient::new(connect_channel(path).await?)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024))
}

/// A channel to the daemon on the unix socket at `path`, for any of its
/// services.
pub async fn connect_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    // The URI is required by the API but unused: the connector dials the
    // socket.
    let channel = Endpoint::from_static("http://cowsnap.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(channel)
}
