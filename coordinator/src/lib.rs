//! The Alveolus coordinator: a gRPC server over mutual TLS that runs federated rounds,
//! aggregates site updates, and keeps a content-addressed registry of global models.
//!
//! It never depends on the agent or on burn: models are named tensors to it.

pub mod aggregate;
pub mod clock;
pub mod config;
pub mod durable;
pub mod engine;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod provision;
pub mod renew;
pub mod roster;
pub mod round;
pub mod run;
pub mod secure;
pub mod server_opt;
pub mod service;
pub mod store;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use alveolus_proto::install_crypto_provider;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

pub use config::CoordinatorSettings;
pub use engine::{Coordinator, UPLOAD_TIMEOUT};
pub use error::CoordinatorError;
use limits::{CountedConnection, PerIdentity};
use service::Services;
use tls::TlsState;

/// How often the round deadline is checked.
const TICK: Duration = Duration::from_millis(250);

/// HTTP/2 streams one connection may have open. An agent uses one at a time (two while a long
/// poll overlaps a pull), the CLI a few; each open stream costs the coordinator buffers, so a
/// peer opening thousands is held to this.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Longest any call may take, from its request to its response: an upload ([`UPLOAD_TIMEOUT`])
/// and its wait for a slot, with room to spare. Long polls are far shorter.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(UPLOAD_TIMEOUT.as_secs() + 120);

/// A connection that answers no HTTP/2 ping within this is closed, with its streams.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest header block a peer may send: gRPC's headers are a few hundred bytes.
const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// Connections one identity may hold open at once. An agent holds one and the CLI one per
/// command; with [`MAX_STREAMS_PER_CONNECTION`] this bounds the streams one identity can open.
const CONNECTIONS_PER_IDENTITY: usize = 8;

/// SIGHUP re-reads the coordinator's certificate and key, the revocation list and the roster,
/// as service managers' `reload` expects (they are also re-read when their files change).
fn spawn_reload_on_hangup(tls: Arc<TlsState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                let tls = Arc::downgrade(&tls);
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        // A coordinator that has stopped leaves nothing to reload.
                        let Some(tls) = tls.upgrade() else { break };
                        tracing::info!(
                            "SIGHUP: reloading certificates, revocation list and roster"
                        );
                        tls.reload();
                    }
                });
            }
            Err(e) => tracing::warn!("SIGHUP will not reload certificates: {e}"),
        }
    }
    #[cfg(not(unix))]
    let _ = tls;
}

/// Serves until `shutdown` completes. The listener is already bound, so tests can use port 0.
pub async fn run(
    listener: TcpListener,
    settings: CoordinatorSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    run_with_metrics(listener, None, settings, shutdown).await
}

/// [`run`], and Prometheus metrics in plain HTTP on `metrics` when it is given (an address the
/// operator chose: loopback, or a monitoring network; never the sites' port).
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    settings: CoordinatorSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let coordinator = Coordinator::open(&settings)?;
    let tls = Arc::new(TlsState::new(&settings)?);
    if let Ok(expires) = alveolus_proto::kit::pem_not_after(&settings.cert_pem) {
        let now = clock::unix_ms() / 1000;
        if let Some(warning) =
            alveolus_proto::kit::expiry_warning("the coordinator's", expires, now)
        {
            tracing::warn!("{warning}");
        }
    }
    let services = Services::new(coordinator.clone(), tls.clone());
    spawn_reload_on_hangup(tls.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    if let Some(listener) = metrics {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics::register(&coordinator, &mut registry);
        let mut stop = stop_rx.clone();
        alveolus_telemetry::spawn(listener, registry, async move {
            let _ = stop.changed().await;
        });
    }

    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
    let mut accept_stop = stop_rx.clone();
    let handshake_timeout = settings.handshake_timeout;
    let connections = PerIdentity::new("connections", CONNECTIONS_PER_IDENTITY);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = accept_stop.changed() => break,
            };
            let acceptor = tls.acceptor();
            let conn_tx = conn_tx.clone();
            let tls = tls.clone();
            let connections = connections.clone();
            // Handshakes run on their own tasks, bounded in time, so a slow or hostile client
            // cannot hold up others.
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let held = match tls.identify(stream.get_ref().1.peer_certificates()) {
                            Ok(identity) => match connections.take(&identity.to_string()) {
                                Ok(held) => Some(held),
                                Err(e) => {
                                    tracing::warn!(%peer, %identity, "connection closed: {e}");
                                    return;
                                }
                            },
                            Err(_) => None,
                        };
                        let stream = CountedConnection::new(stream, held);
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "TLS handshake refused: {e}"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });

    let mut tick_stop = stop_rx.clone();
    let ticker = coordinator.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = interval.tick() => ticker.tick(),
                _ = tick_stop.changed() => break,
            }
        }
    });

    let mut health_stop = stop_rx.clone();
    let mut serve_stop = stop_rx;
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .timeout(REQUEST_TIMEOUT);
    services
        .routes(&mut server, async move {
            let _ = health_stop.changed().await;
        })
        .await
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
            let _ = serve_stop.changed().await;
        })
        .await
        .map_err(|e| CoordinatorError::Tls(format!("server: {e}")))
}
