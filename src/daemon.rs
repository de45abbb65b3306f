//! The daemon: sets up the root, opens the core, serves the snapshots API
//! on a unix socket until SIGTERM/SIGINT, then finishes in-flight calls and
//! closes the metadata.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

use crate::admin::AdminService;
use crate::backend::Backend;
use crate::backend::btrfs::BtrfsBackend;
use crate::backend::zfs::ZfsBackend;
use crate::config::{BackendKind, Config};
use crate::embedded::{self, RootSetup};
use crate::grpc::SnapshotsService;
use crate::snapshotter::Snapshotter;

/// How long shutdown waits for in-flight calls.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Errors that stop the daemon, with what it was doing.
pub type DaemonError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the daemon with `cfg` until a termination signal: starts the
/// runtime, serves, shuts the runtime down (which ends idle connections and
/// closes the metadata), then unmounts an embedded image it mounted.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = rt.block_on(serve(cfg));
    // Calls in flight already finished; this drops idle connections and,
    // with them, the last references to the core.
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Some(embedded_root) = result? {
        embedded_root.release();
    }
    info!("stopped");
    Ok(())
}

/// Serves until a termination signal; returns the embedded root (btrfs
/// backend) for the caller to release once nothing uses the filesystem any
/// more.
async fn serve(cfg: Config) -> Result<Option<embedded::EmbeddedRoot>, DaemonError> {
    let started = Instant::now();
    // First of all: a SIGTERM during startup (repair, mounting the image)
    // or right after READY must shut down cleanly, not kill the daemon.
    let terminated = termination_signal();
    cfg.validate()?;
    let (embedded_root, backend) = match cfg.backend {
        BackendKind::Btrfs => {
            let (root, backend) = open_btrfs(&cfg).await?;
            (Some(root), backend)
        }
        BackendKind::Zfs => (None, open_zfs(&cfg).await?),
    };

    let root = cfg.root.clone();
    let (core, report) =
        tokio::task::spawn_blocking(move || Snapshotter::open(&root, backend)).await??;

    if report.is_clean() {
        info!("startup check: metadata and filesystem agree");
    } else {
        warn!(?report, "startup repair reconciled metadata and filesystem");
    }
    info!(backend = %core.describe_backend(), "snapshotter ready");
    let core = Arc::new(core);

    if let Some(addr) = &cfg.metrics_address {
        crate::metrics::serve(addr, core.clone()).await?;
    }
    let listener = bind_socket(&cfg.address)?;
    let incoming = UnixListenerStream::new(listener);
    info!(
        address = %cfg.address.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "serving containerd.services.snapshots.v1.Snapshots"
    );
    notify_systemd("READY=1");

    let service = SnapshotsService::new(core.clone());
    let in_flight = service.in_flight();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .add_service(AdminService::new(core.clone(), in_flight.clone()).into_server())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let served = tokio::select! {
        r = &mut server => Some(r),
        () = terminated => None,
    };
    let served = match served {
        Some(r) => r,
        None => {
            notify_systemd("STOPPING=1");
            // Stop accepting, let in-flight calls finish and answer; idle
            // connections (containerd never closes its own) are not waited
            // for.
            let _ = stop_tx.send(());
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while !server.is_finished()
                && in_flight.load(Ordering::SeqCst) > 0
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The last answers are being written out: give them a moment.
            let _ = tokio::time::timeout(Duration::from_millis(200), &mut server).await;
            server.abort();
            Ok(Ok(()))
        }
    };
    if let Err(e) = fs::remove_file(&cfg.address) {
        warn!(address = %cfg.address.display(), error = %e, "could not remove the socket");
    }
    // No call is running any more. Idle connection tasks still hold
    // clones of the core; they end, and the metadata closes, when the
    // runtime shuts down right after this returns.
    if in_flight.load(Ordering::SeqCst) > 0 {
        warn!("calls still running after the grace period; exiting without waiting for them");
    }
    // Destroy the objects that Removes queued (one ioctl each); after a
    // crash, startup repair would destroy them as orphans.
    let finishing = core.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || finishing.shutdown()).await {
        warn!(error = %e, "could not finish the queued destroys; startup repair destroys what is left");
    }
    drop(core);
    match served {
        Ok(r) => r?,
        Err(e) if e.is_cancelled() => {}
        Err(e) => return Err(format!("server task failed: {e}").into()),
    }
    Ok(embedded_root)
}

/// Sets up the btrfs root (mounting the embedded image where the root is
/// not on btrfs) and opens the btrfs backend on it.
async fn open_btrfs(
    cfg: &Config,
) -> Result<(embedded::EmbeddedRoot, Box<dyn Backend>), DaemonError> {
    let image = cfg.embedded_image_path();
    let (embedded_root, setup) = embedded::ensure_btrfs_root(&cfg.root, &cfg.embedded, &image)?;
    match &setup {
        RootSetup::AlreadyBtrfs => info!(root = %cfg.root.display(), "root is on btrfs"),
        RootSetup::MountedExisting { image } => {
            info!(root = %cfg.root.display(), image = %image.display(), "mounted the existing embedded btrfs image on the root")
        }
        RootSetup::CreatedAndMounted { image, size } => info!(
            root = %cfg.root.display(), image = %image.display(), size,
            "root was not on btrfs: created a sparse btrfs image and mounted it on the root"
        ),
    }
    fs::set_permissions(&cfg.root, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod 0700 {}: {e}", cfg.root.display()))?;
    let root = cfg.root.clone();
    let (quota, sync) = (cfg.btrfs.quota, cfg.btrfs.commit_sync);
    if !sync {
        warn!(
            "btrfs.commit_sync = false: a power cut can tear layers whose Commit was acknowledged"
        );
    }
    let backend = tokio::task::spawn_blocking(move || {
        BtrfsBackend::open(&root, quota).map(|b| b.with_commit_sync(sync))
    })
    .await??;
    Ok((embedded_root, Box::new(backend)))
}

/// Creates the root directory (it holds only the metadata) and opens the
/// ZFS backend on `zfs.dataset`.
async fn open_zfs(cfg: &Config) -> Result<Box<dyn Backend>, DaemonError> {
    fs::create_dir_all(&cfg.root)
        .map_err(|e| format!("creating the root {}: {e}", cfg.root.display()))?;
    fs::set_permissions(&cfg.root, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod 0700 {}: {e}", cfg.root.display()))?;
    let dataset = cfg.zfs.dataset.clone().ok_or("zfs.dataset is not set")?;
    let backend = tokio::task::spawn_blocking(move || ZfsBackend::open(&dataset)).await??;
    Ok(Box::new(backend))
}

/// Takes over SIGTERM and SIGINT now and returns a future that completes
/// on either. Called first thing in `serve`: a supervisor may send SIGTERM
/// at any moment, and until the handlers are registered that signal's
/// default action would kill the daemon mid-startup.
fn termination_signal() -> impl std::future::Future<Output = ()> {
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (mut term, mut int) = match signals {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                error!(error = %e, "cannot listen for termination signals");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: finishing in-flight calls"),
            _ = int.recv() => info!("SIGINT: finishing in-flight calls"),
        }
    }
}

/// Binds the socket: creates its directory, replaces a stale socket file
/// (refusing if another daemon answers on it) and sets mode 0660.
fn bind_socket(address: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = address.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| format!("creating socket directory {}: {e}", dir.display()))?;
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            return Err(format!("another process is serving on {}", address.display()).into());
        }
        fs::remove_file(address)
            .map_err(|e| format!("removing stale socket {}: {e}", address.display()))?;
    }
    // The socket accepts connections as soon as bind(2) creates it, with
    // mode 0777 & ~umask: create it 0660 already, so that no client ever
    // sees another mode. The umask is process-wide; nothing else creates
    // files at this point of startup.
    let previous = umask(Mode::from_bits_truncate(0o117));
    let bound = UnixListener::bind(address);
    umask(previous);
    let listener = bound.map_err(|e| format!("binding {}: {e}", address.display()))?;
    fs::set_permissions(address, fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod 0660 {}: {e}", address.display()))?;
    Ok(listener)
}

/// Sends a state line to systemd when run as a Type=notify unit.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "sd_notify: cannot create a socket");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        warn!(error = %e, state, "sd_notify failed");
    }
}
