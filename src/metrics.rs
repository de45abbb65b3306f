//! Prometheus metrics, served over HTTP at `GET /metrics` when
//! `metrics_address` is configured (off by default).
//!
//! Per-call latency and errors are recorded as calls finish; the state
//! figures (snapshots and bytes by kind, quota mode and consistency) are
//! read from the core when the endpoint is scraped, so they are never
//! stale and cost nothing between scrapes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::error::Code;
use crate::model::Kind;
use crate::snapshotter::{RepairReport, Snapshotter};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

struct Metrics {
    registry: Registry,
    rpc_duration: Family<MethodLabels, Histogram>,
    rpc_errors: Family<ErrorLabels, Counter>,
    snapshots: Family<KindLabels, Gauge>,
    bytes: Family<KindLabels, Gauge>,
    quota_mode: Family<ModeLabels, Gauge>,
    quota_consistent: Gauge,
    cleanup_reclaimed: Gauge,
    cleanup_orphans: Counter,
    repairs: Family<ActionLabels, Counter>,
}

fn rpc_histogram() -> Histogram {
    // 50 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("cowsnap");
    let rpc_duration =
        Family::<MethodLabels, Histogram>::new_with_constructor(rpc_histogram as fn() -> Histogram);
    registry.register(
        "rpc_duration_seconds",
        "Time to serve a call, by method (snapshots and admin APIs)",
        rpc_duration.clone(),
    );
    let rpc_errors = Family::<ErrorLabels, Counter>::default();
    registry.register(
        "rpc_errors",
        "Calls answered with an error, by method and gRPC code",
        rpc_errors.clone(),
    );
    let snapshots = Family::<KindLabels, Gauge>::default();
    registry.register("snapshots", "Snapshots by kind", snapshots.clone());
    let bytes = Family::<KindLabels, Gauge>::default();
    registry.register(
        "snapshot_exclusive_bytes",
        "Exclusive bytes of the snapshots of each kind, from quota accounting",
        bytes.clone(),
    );
    let quota_mode = Family::<ModeLabels, Gauge>::default();
    registry.register(
        "quota_mode",
        "1 for the quota accounting mode in use",
        quota_mode.clone(),
    );
    let quota_consistent = Gauge::default();
    registry.register(
        "quota_consistent",
        "1 when the filesystem's quota accounting is consistent, 0 when it needs a rescan",
        quota_consistent.clone(),
    );
    let cleanup_reclaimed = Gauge::default();
    registry.register(
        "cleanup_last_reclaimed_bytes",
        "Bytes held by the orphans the last cleanup destroyed",
        cleanup_reclaimed.clone(),
    );
    let cleanup_orphans = Counter::default();
    registry.register(
        "cleanup_orphans_destroyed",
        "Orphan objects destroyed by cleanups",
        cleanup_orphans.clone(),
    );
    let repairs = Family::<ActionLabels, Counter>::default();
    registry.register(
        "repair_actions",
        "Startup repair actions: orphans destroyed, records dropped, objects reconciled, committed objects missing",
        repairs.clone(),
    );
    Metrics {
        registry,
        rpc_duration,
        rpc_errors,
        snapshots,
        bytes,
        quota_mode,
        quota_consistent,
        cleanup_reclaimed,
        cleanup_orphans,
        repairs,
    }
});

/// Records one finished call.
pub fn observe_call(method: &str, elapsed: Duration, error: Option<Code>) {
    let m = &*METRICS;
    m.rpc_duration
        .get_or_create(&MethodLabels {
            method: method.to_owned(),
        })
        .observe(elapsed.as_secs_f64());
    if let Some(code) = error {
        m.rpc_errors
            .get_or_create(&ErrorLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// Records what a cleanup did.
pub fn observe_cleanup(report: &RepairReport) {
    let m = &*METRICS;
    m.cleanup_reclaimed
        .set(i64::try_from(report.reclaimed_bytes).unwrap_or(i64::MAX));
    m.cleanup_orphans.inc_by(report.orphans_destroyed);
}

/// Records what startup repair did.
pub fn observe_repair(report: &RepairReport) {
    let m = &*METRICS;
    for (action, n) in [
        ("orphan_destroyed", report.orphans_destroyed),
        ("record_dropped", report.records_dropped.len() as u64),
        ("object_reconciled", report.objects_reconciled),
        ("committed_missing", report.committed_missing.len() as u64),
    ] {
        m.repairs
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
            })
            .inc_by(n);
    }
}

/// Reads the state figures from the core and renders every metric in the
/// Prometheus text format.
pub fn render(core: &Snapshotter) -> Result<String, crate::error::Error> {
    let m = &*METRICS;
    let report = core.usage_report()?;
    for kind in [Kind::Active, Kind::View, Kind::Committed] {
        let of_kind = report.snapshots.iter().filter(|d| d.record.kind == kind);
        let (count, bytes) = of_kind.fold((0i64, 0u64), |(c, b), d| {
            (c + 1, b + d.space.map(|s| s.exclusive).unwrap_or(0))
        });
        let labels = KindLabels {
            kind: kind.as_str().to_owned(),
        };
        m.snapshots.get_or_create(&labels).set(count);
        m.bytes
            .get_or_create(&labels)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    m.quota_mode.clear();
    m.quota_mode
        .get_or_create(&ModeLabels {
            mode: report.accounting.mode.clone(),
        })
        .set(1);
    m.quota_consistent
        .set(i64::from(report.accounting.consistent));
    let mut out = String::new();
    encode(&mut out, &m.registry)
        .map_err(|e| crate::error::Error::Internal(format!("encoding metrics: {e}")))?;
    Ok(out)
}

/// Serves `GET /metrics` on `address` until the process ends.
pub async fn serve(
    address: &str,
    core: Arc<Snapshotter>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr: SocketAddr = address
        .parse()
        .map_err(|e| format!("metrics_address {address:?} is not host:port: {e}"))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the metrics endpoint {addr}: {e}"))?;
    info!(%addr, "serving Prometheus metrics at /metrics");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let core = core.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(req, core.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok(())
}

async fn handle(
    req: Request<Incoming>,
    core: Arc<Snapshotter>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try GET /metrics\n".into(),
        ));
    }
    let rendered = tokio::task::spawn_blocking(move || render(&core)).await;
    Ok(match rendered {
        Ok(Ok(text)) => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            text,
        ),
        Ok(Err(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    })
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
