//! The researcher's dashboard: a web page on the researcher's own machine that shows the
//! coordinator's runs and sites live. It talks to the coordinator only over the Admin API with
//! the researcher's admin kit (mTLS, outbound), so the coordinator opens no port for it; the
//! page is server-rendered HTML with inline SVG charts and a short script that asks for the
//! live part again whenever the run moves on. The same views make a run's report: one HTML
//! file with its PNG plots ([`report`]).

pub mod chart;
pub mod png;
pub mod report;
pub mod view;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alveolus_proto::client::{AdminClient, ClientError};
use alveolus_proto::domain::RunInfo;
use alveolus_proto::identity::Role;
use alveolus_proto::kit::{ClientKit, KitError};
use alveolus_proto::unix_ms;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::net::TcpListener;

use view::{Header, Snapshot};

/// Longest the server holds a request for the live part before answering with what it has.
const HOLD: Duration = Duration::from_secs(20);

/// How often a held request asks the coordinator whether the run moved on.
const RECHECK: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("{} is a {role} kit; reading the coordinator's runs needs an admin kit", dir.display())]
    NotAdmin { dir: PathBuf, role: Role },
    #[error(
        "the admin kit's certificate in {} expired on {}; ask the project's operator for a new kit",
        dir.display(),
        view::utc(*expired)
    )]
    Expired { dir: PathBuf, expired: i64 },
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("the dashboard stopped: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Coordinator(#[from] ClientError),
    #[error(transparent)]
    Report(#[from] report::ReportError),
}

/// What the page header says of the admin kit in `kit_dir`, once it is known to be an admin kit
/// whose certificate is valid.
fn admin_header(kit_dir: &Path) -> Result<Header, DashboardError> {
    let kit = ClientKit::load(kit_dir)?;
    if kit.identity.role != Role::Admin {
        return Err(DashboardError::NotAdmin {
            dir: kit_dir.to_path_buf(),
            role: kit.identity.role,
        });
    }
    let expires = kit.certificate_expires()?;
    if expires * 1000 <= unix_ms() {
        return Err(DashboardError::Expired {
            dir: kit_dir.to_path_buf(),
            expired: expires,
        });
    }
    Ok(Header {
        project: kit.config.project.clone(),
        coordinator: kit.config.coordinator.clone(),
        admin: kit.config.name.clone(),
        kit_expires: expires,
    })
}

/// Writes the report of run `run` (the newest when empty) into `out`, reading the coordinator
/// with the admin kit in `kit_dir`.
pub async fn write_report(
    kit_dir: &Path,
    run: &str,
    out: &Path,
) -> Result<(RunInfo, report::Report), DashboardError> {
    let header = admin_header(kit_dir)?;
    let mut client = AdminClient::connect(kit_dir).await?;
    let info = client.run(run).await?;
    let sites = client.sites().await?;
    let written = report::write(out, &header, &info, sites, unix_ms())?;
    Ok((info, written))
}

/// The dashboard's side: the admin kit and a connection to the coordinator, made when first
/// needed and made again after it fails.
pub struct Dashboard {
    kit_dir: PathBuf,
    header: Header,
    client: tokio::sync::Mutex<Option<AdminClient>>,
}

impl Dashboard {
    /// Checks the kit before anything is served: an admin kit whose certificate is valid.
    pub fn open(kit_dir: &Path) -> Result<Self, DashboardError> {
        Ok(Self {
            kit_dir: kit_dir.to_path_buf(),
            header: admin_header(kit_dir)?,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The runs and sites as the coordinator has them now.
    async fn snapshot(&self) -> Result<Snapshot, ClientError> {
        let mut slot = self.client.lock().await;
        if slot.is_none() {
            *slot = Some(AdminClient::connect(&self.kit_dir).await?);
        }
        let client = slot.as_mut().expect("connected above");
        let read = async {
            let runs = client.runs().await?;
            let sites = client.sites().await?;
            Ok::<_, ClientError>(Snapshot {
                runs,
                sites,
                now_ms: unix_ms(),
            })
        };
        let result = read.await;
        if result.is_err() {
            // Connect afresh next time: the coordinator may have restarted.
            *slot = None;
        }
        result
    }

    async fn model(&self, version: &str) -> Result<bytes::Bytes, ClientError> {
        let mut client = AdminClient::connect(&self.kit_dir).await?;
        Ok(client.pull_model(version).await?.1)
    }
}

/// Binds the dashboard's address, so that a port in use is reported before anything starts.
pub async fn bind(address: &str) -> Result<TcpListener, DashboardError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| DashboardError::Bind {
            address: address.to_string(),
            source,
        })
}

/// Serves the dashboard until `shutdown` completes. The listener is already bound, so tests
/// can use port 0.
pub async fn serve(
    listener: TcpListener,
    dashboard: Dashboard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DashboardError> {
    let app = axum::Router::new()
        .route("/", get(index))
        .route("/live", get(live))
        .route("/api/state", get(state))
        .route("/model/{version}", get(model))
        .with_state(Arc::new(dashboard));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(DashboardError::Serve)
}

#[derive(Deserialize)]
struct Selection {
    /// The run to show; the newest when absent or empty.
    run: Option<String>,
    /// The live part's key the browser has: hold the answer until it changes.
    after: Option<String>,
}

/// The live part for the run asked for, rendered from what the coordinator answered.
struct Rendered {
    status: StatusCode,
    body: String,
    /// Finished rounds of the run shown.
    rounds: usize,
    /// The shown run's key while it is in progress: a request may be held until it changes.
    running_key: Option<String>,
}

fn render(snapshot: Result<Snapshot, ClientError>, run: Option<&str>) -> Rendered {
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(e) => {
            return Rendered {
                status: StatusCode::BAD_GATEWAY,
                body: view::unreachable(&e.to_string()),
                rounds: 0,
                running_key: None,
            };
        }
    };
    match snapshot.selected(run) {
        Ok(selected) => Rendered {
            status: StatusCode::OK,
            body: view::live(&snapshot, selected),
            rounds: selected.map_or(0, |r| r.rounds.len()),
            running_key: selected
                .filter(|r| r.state == alveolus_proto::domain::RunState::Running)
                .map(|r| snapshot.key(Some(r))),
        },
        Err(missing) => Rendered {
            status: StatusCode::NOT_FOUND,
            body: view::no_such_run(&snapshot, missing),
            rounds: 0,
            running_key: None,
        },
    }
}

async fn index(State(dashboard): State<Arc<Dashboard>>, Query(q): Query<Selection>) -> Response {
    let rendered = render(dashboard.snapshot().await, q.run.as_deref());
    let page = view::page(
        &dashboard.header,
        &rendered.body,
        rendered.rounds,
        unix_ms(),
    );
    (rendered.status, no_store(), Html(page)).into_response()
}

async fn live(State(dashboard): State<Arc<Dashboard>>, Query(q): Query<Selection>) -> Response {
    let held_since = Instant::now();
    loop {
        let rendered = render(dashboard.snapshot().await, q.run.as_deref());
        let unchanged =
            rendered.running_key.is_some() && rendered.running_key.as_deref() == q.after.as_deref();
        if !unchanged || held_since.elapsed() >= HOLD {
            return (rendered.status, no_store(), Html(rendered.body)).into_response();
        }
        tokio::time::sleep(RECHECK).await;
    }
}

/// The runs and sites as JSON, for scripts.
async fn state(State(dashboard): State<Arc<Dashboard>>) -> Response {
    match dashboard.snapshot().await {
        Ok(snapshot) => (
            no_store(),
            axum::Json(serde_json::json!({
                "runs": snapshot.runs,
                "sites": snapshot.sites,
            })),
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// A checkpoint, digest-checked on its way from the coordinator, as a download.
async fn model(
    State(dashboard): State<Arc<Dashboard>>,
    UrlPath(version): UrlPath<String>,
) -> Response {
    let is_digest = version.len() == 64 && version.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_digest {
        return (
            StatusCode::BAD_REQUEST,
            "a model version is the sha256 of its file: 64 hexadecimal digits",
        )
            .into_response();
    }
    match dashboard.model(&version).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{version}.safetensors\""),
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(ClientError::Status(s)) if s.code() == tonic::Code::NotFound => {
            (StatusCode::NOT_FOUND, s.message().to_string()).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

fn no_store() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}
