//! What a running coordinator or agent shows to the operator's monitoring: a Prometheus
//! endpoint over plain HTTP on an address the operator chooses, and the process's own gauges.
//!
//! The endpoint is read-only and carries counts, durations and names the operator already
//! knows (runs, sites); nothing about a patient or a scan is ever a metric.

pub mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
pub use prometheus_client;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The one path the endpoint answers; anything else is 404, any method but GET (and HEAD) 405.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot listen for metrics on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("metrics endpoint on {address} stopped: {source}")]
    Serve {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the metrics address, so that a port in use is reported before anything else starts.
pub async fn bind(address: &str) -> Result<TcpListener, TelemetryError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| TelemetryError::Bind {
            address: address.to_string(),
            source,
        })
}

/// Serves `registry` in the Prometheus text format at [`METRICS_PATH`] until `shutdown`
/// completes. The listener is already bound, so tests can use port 0.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TelemetryError> {
    let address = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind {
            address: "(the metrics listener)".into(),
            source,
        })?;
    let app = axum::Router::new()
        .route(METRICS_PATH, get(scrape))
        .with_state(registry);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| TelemetryError::Serve { address, source })
}

/// Serves in the background, logging where, and logging (not propagating) a failure: the
/// service it watches keeps running without its metrics.
pub fn spawn(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, path = METRICS_PATH, "serving Prometheus metrics");
    }
    tokio::spawn(async move {
        if let Err(e) = serve(listener, Arc::new(registry), shutdown).await {
            tracing::error!("{e}");
        }
    });
}

async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
    let mut body = String::new();
    match prometheus_text::encode(&mut body, &registry) {
        Ok(()) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded",
        )
            .into_response(),
    }
}
