//! The researcher's typed client of the coordinator's Admin service, for every tool that
//! starts, follows or stops runs (the CLI, the demo, benchmarks, tests): domain types in and
//! out, models received with their size, digest and version checked.

use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::transport::Channel;

use crate::domain::{DomainError, ModelHeader, RunConfig, RunEvent, RunInfo, SiteInfo};
use crate::identity::Role;
use crate::kit::{ClientKit, KitError};
use crate::pb::{self, admin_client, federation_client};
use crate::transfer::{ModelReceiveError, framed, receive_model, receive_model_reporting};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("{} is a {role} kit; this needs an admin kit", dir.display())]
    NotAdmin { dir: std::path::PathBuf, role: Role },
    #[error("coordinator: {} ({:?})", .0.message(), .0.code())]
    Status(#[from] tonic::Status),
    #[error("the coordinator sent an invalid message: {0}")]
    Domain(#[from] DomainError),
    #[error("model download: {0}")]
    Model(#[from] ModelReceiveError),
}

/// A connection to the Admin service with an admin kit's certificate.
#[derive(Clone)]
pub struct AdminClient {
    inner: admin_client::AdminClient<Channel>,
}

impl From<admin_client::AdminClient<Channel>> for AdminClient {
    fn from(inner: admin_client::AdminClient<Channel>) -> Self {
        Self { inner }
    }
}

impl AdminClient {
    /// Connects with the admin kit in `kit_dir` (a site's kit is refused here, before any
    /// connection).
    pub async fn connect(kit_dir: &Path) -> Result<Self, ClientError> {
        let kit = ClientKit::load(kit_dir)?;
        if kit.identity.role != Role::Admin {
            return Err(ClientError::NotAdmin {
                dir: kit_dir.to_path_buf(),
                role: kit.identity.role,
            });
        }
        Ok(admin_client::AdminClient::new(kit.connect().await?).into())
    }

    /// Starts a run from `model` (safetensors bytes).
    pub async fn start_run(
        &mut self,
        config: RunConfig,
        model: Bytes,
    ) -> Result<RunInfo, ClientError> {
        let mut config = pb::RunConfig::from(config);
        config.initial_model_bytes = model.len() as u64;
        let messages: Vec<pb::StartRunChunk> = framed(config, &model);
        let info = self
            .inner
            .start_run(futures::stream::iter(messages))
            .await?
            .into_inner();
        Ok(RunInfo::try_from(info)?)
    }

    /// A run by id; the newest when `run_id` is empty.
    pub async fn run(&mut self, run_id: &str) -> Result<RunInfo, ClientError> {
        let info = self.inner.get_run(request(run_id)).await?.into_inner();
        Ok(RunInfo::try_from(info)?)
    }

    pub async fn runs(&mut self) -> Result<Vec<RunInfo>, ClientError> {
        let runs = self
            .inner
            .list_runs(pb::ListRunsRequest {})
            .await?
            .into_inner()
            .runs;
        Ok(runs
            .into_iter()
            .map(RunInfo::try_from)
            .collect::<Result<_, _>>()?)
    }

    /// The run's events from its start, then live ones, until it ends.
    pub async fn events(
        &mut self,
        run_id: &str,
    ) -> Result<impl Stream<Item = Result<RunEvent, ClientError>> + use<>, ClientError> {
        let stream = self.inner.watch_run(request(run_id)).await?.into_inner();
        Ok(stream.map(|event| Ok(RunEvent::try_from(event?)?)))
    }

    pub async fn abort(&mut self, run_id: &str) -> Result<RunInfo, ClientError> {
        let info = self.inner.abort_run(request(run_id)).await?.into_inner();
        Ok(RunInfo::try_from(info)?)
    }

    pub async fn sites(&mut self) -> Result<Vec<SiteInfo>, ClientError> {
        let sites = self
            .inner
            .list_sites(pb::ListSitesRequest {})
            .await?
            .into_inner()
            .sites;
        Ok(sites.into_iter().map(SiteInfo::from).collect())
    }

    /// A model version (the newest when empty), digest-checked, with its header.
    pub async fn pull_model(&mut self, version: &str) -> Result<(ModelHeader, Bytes), ClientError> {
        let stream = self
            .inner
            .pull_model(pb::PullModelRequest {
                version: version.to_string(),
            })
            .await?
            .into_inner();
        Ok(receive_model(stream, version).await?)
    }
}

/// A model version (the newest when empty) with any kit: through the Admin service with an
/// admin kit, through the Federation service with a site's, the same checks either way.
pub async fn pull_model_with_kit(
    kit_dir: &Path,
    version: &str,
) -> Result<(ModelHeader, Bytes), ClientError> {
    pull_model_with_kit_reporting(kit_dir, version, &mut |_, _| {}).await
}

/// [`pull_model_with_kit`], telling `progress` the bytes received so far and the model's size
/// after each chunk.
pub async fn pull_model_with_kit_reporting(
    kit_dir: &Path,
    version: &str,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(ModelHeader, Bytes), ClientError> {
    let kit = ClientKit::load(kit_dir)?;
    let channel = kit.connect().await?;
    let request = pb::PullModelRequest {
        version: version.to_string(),
    };
    let stream = if kit.identity.role == Role::Admin {
        admin_client::AdminClient::new(channel)
            .pull_model(request)
            .await?
            .into_inner()
    } else {
        federation_client::FederationClient::new(channel)
            .pull_model(request)
            .await?
            .into_inner()
    };
    Ok(receive_model_reporting(stream, version, progress).await?)
}

fn request(run_id: &str) -> pb::GetRunRequest {
    pb::GetRunRequest {
        run_id: run_id.to_string(),
    }
}

/// What the coordinator's `grpc.health.v1` service says of `service` (`""`: the coordinator as
/// a whole), asked with any kit: the same check a load balancer or probe makes.
pub async fn health(kit: &ClientKit, service: &str) -> Result<HealthStatus, ClientError> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut client = HealthClient::new(kit.connect().await?);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?
        .into_inner();
    Ok(match response.status() {
        tonic_health::pb::health_check_response::ServingStatus::Serving => HealthStatus::Serving,
        tonic_health::pb::health_check_response::ServingStatus::NotServing => {
            HealthStatus::NotServing
        }
        _ => HealthStatus::Unknown,
    })
}

/// The answer of a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Serving,
    NotServing,
    Unknown,
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthStatus::Serving => "SERVING",
            HealthStatus::NotServing => "NOT_SERVING",
            HealthStatus::Unknown => "UNKNOWN",
        })
    }
}
