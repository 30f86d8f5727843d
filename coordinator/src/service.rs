//! The gRPC edge: authorisation by certificate role, `pb` <-> domain conversion, chunked
//! transfers. No `pb` type goes further in.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use alveolus_proto::PROTOCOL_VERSION;
use alveolus_proto::domain::{Join, ModelHeader, RunConfig, UpdateHeader, ValidationReport};
use alveolus_proto::identity::{Identity, Role};
use alveolus_proto::kit::expiry_warning;
use alveolus_proto::pb::{self, admin_server::Admin, federation_server::Federation};
use alveolus_proto::transfer::{Framed, framed, receive_header, receive_payload};
use alveolus_proto::weights::Weights;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Coordinator, UPLOAD_TIMEOUT, Upload};
use crate::error::CoordinatorError;
use crate::limits::PerIdentity;
use crate::metrics::Transfer;
use crate::tls::TlsState;

/// Longest an upload may go without sending anything: a site that opens an upload and stalls
/// gives its slot back after this, not at the round's deadline.
const UPLOAD_IDLE: Duration = Duration::from_secs(30);

/// Room for an update's safetensors header (tensor names and shapes) beyond its values.
const UPDATE_HEADER_SLACK: u64 = 1 << 20;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Long polls (NextTask, secure-aggregation steps) one identity may have waiting at once; an
/// agent has one.
const WAITING_CALLS_PER_IDENTITY: usize = 2;

/// Model downloads one identity may have streaming at once; an agent has one.
const PULLS_PER_IDENTITY: usize = 2;

/// Both services share the coordinator and the TLS state (for identities and revocation).
#[derive(Clone)]
pub struct Services {
    pub coordinator: Arc<Coordinator>,
    pub tls: Arc<TlsState>,
    /// Calls that wait (long polls), counted per identity.
    waiting: PerIdentity,
    /// Model downloads in progress, counted per identity.
    pulls: PerIdentity,
}

impl Services {
    pub fn new(coordinator: Arc<Coordinator>, tls: Arc<TlsState>) -> Self {
        Self {
            coordinator,
            tls,
            waiting: PerIdentity::new("waiting calls", WAITING_CALLS_PER_IDENTITY),
            pulls: PerIdentity::new("model downloads", PULLS_PER_IDENTITY),
        }
    }

    /// The Federation and Admin services on `server`, sharing these handles.
    /// The two services, and `grpc.health.v1` reporting through `health`: serving from here
    /// on, not serving once `stopping` fires, so that a load balancer drains the coordinator
    /// before it goes.
    pub async fn routes(
        self,
        server: &mut tonic::transport::Server,
        stopping: impl Future<Output = ()> + Send + 'static,
    ) -> tonic::transport::server::Router {
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<pb::federation_server::FederationServer<Self>>()
            .await;
        health
            .set_serving::<pb::admin_server::AdminServer<Self>>()
            .await;
        tokio::spawn(async move {
            stopping.await;
            for name in [
                "",
                <pb::federation_server::FederationServer<Self> as tonic::server::NamedService>::NAME,
                <pb::admin_server::AdminServer<Self> as tonic::server::NamedService>::NAME,
            ] {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        });
        server
            .add_service(health_service)
            .add_service(pb::federation_server::FederationServer::new(self.clone()))
            .add_service(pb::admin_server::AdminServer::new(self))
    }

    fn caller<T>(&self, request: &Request<T>, role: Role) -> Result<Identity, Status> {
        let certs = request.peer_certs();
        Ok(self
            .tls
            .require(certs.as_deref().map(Vec::as_slice), role)?)
    }

    /// A model download, counted against `who`'s downloads until the stream is dropped.
    fn model_stream(
        &self,
        who: &Identity,
        version: &str,
    ) -> Result<ResponseStream<pb::ModelChunk>, Status> {
        let held = self.pulls.take(&who.to_string())?;
        let (bytes, manifest) = self.coordinator.model(version)?;
        let validation = self.coordinator.validations_of(&manifest);
        let header = ModelHeader {
            version: manifest.sha256.clone(),
            total_bytes: bytes.len() as u64,
            manifest_json: manifest.served_json(&validation),
        };
        let messages: Vec<pb::ModelChunk> = framed(header.into(), &bytes);
        let coordinator = self.coordinator.clone();
        Ok(Box::pin(futures::stream::iter(messages).map(move |m| {
            let _counted = &held;
            // Counted as handed to the transport: a download cut short counts what went out.
            let sent = prost::Message::encoded_len(&m) as u64;
            coordinator.metrics().sent(Transfer::Model, sent);
            Ok(m)
        })))
    }
}

/// Receives an update's data, bounded in size and in time (the upload's `until`, and
/// [`UPLOAD_IDLE`] between messages): a site that opens an upload and stalls must not hold its
/// slot for long.
async fn receive_update(
    site: &str,
    stream: Streaming<pb::UpdateChunk>,
    upload: &Upload,
    total_bytes: u64,
    limit: u64,
) -> Result<bytes::Bytes, CoordinatorError> {
    receive_bounded(stream, upload, total_bytes, limit)
        .await
        .inspect_err(|e| tracing::warn!(%site, "update refused: {e}"))
}

/// The data of a transfer whose header was read, bounded in size, in time (`upload.until`)
/// and in silence ([`UPLOAD_IDLE`] between messages).
async fn receive_bounded<M: Framed>(
    stream: Streaming<M>,
    upload: &Upload,
    total_bytes: u64,
    limit: u64,
) -> Result<bytes::Bytes, CoordinatorError> {
    let idle = tokio_stream::StreamExt::timeout(stream, UPLOAD_IDLE).map(|message| {
        message.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "nothing received for {} s",
                UPLOAD_IDLE.as_secs()
            )))
        })
    });
    let mut idle = std::pin::pin!(idle);
    let receiving = receive_payload(&mut idle, total_bytes, limit);
    tokio::time::timeout_at(upload.until, receiving)
        .await
        .map_err(|_| {
            CoordinatorError::Stream(format!(
                "upload not finished in time (the round's deadline, at most {} s)",
                UPLOAD_TIMEOUT.as_secs()
            ))
        })?
        .map_err(CoordinatorError::from)
}

impl Services {
    /// A masked update is exactly the round's number of little-endian u64 words; they are
    /// added straight from the received bytes into the round's masked sum.
    async fn push_masked_update(
        &self,
        site: &str,
        header: &UpdateHeader,
        stream: Streaming<pb::UpdateChunk>,
    ) -> Result<usize, CoordinatorError> {
        let expected = self.coordinator.masked_bytes(site, header)?;
        if header.total_bytes != expected {
            return Err(CoordinatorError::SecureAggregation(format!(
                "a masked update for this model has {expected} bytes, not {}",
                header.total_bytes
            )));
        }
        let upload = self.coordinator.upload_slot(site).await?;
        let bytes = receive_update(site, stream, &upload, expected, expected).await?;
        self.coordinator
            .metrics()
            .received(Transfer::Update, bytes.len() as u64);
        self.coordinator
            .accept_masked_update(site, header, &bytes)
            .inspect_err(|e| tracing::warn!(%site, "masked update refused: {e}"))
    }

    /// An update from its header to the round: refused before any data where the header
    /// says it cannot be used, bounded while it streams, checked again before it is folded.
    async fn receive_and_fold(
        &self,
        site: &str,
        mut stream: Streaming<pb::UpdateChunk>,
    ) -> Result<usize, CoordinatorError> {
        let header = receive_header(&mut stream).await?;
        let header = UpdateHeader::try_from(header)?;
        if header.masked {
            return self.push_masked_update(site, &header, stream).await;
        }
        // Refuse stale or duplicate updates before receiving a byte of data.
        let base = self.coordinator.check_update(site, &header)?;
        // An update has the base model's tensors: its size is known up to the header, so a site
        // cannot make the coordinator reserve more than a model's worth of memory.
        let limit = (base.num_values() as u64 * 4 + UPDATE_HEADER_SLACK)
            .min(self.coordinator.max_model_bytes());
        let upload = self.coordinator.upload_slot(site).await?;
        let bytes = receive_update(site, stream, &upload, header.total_bytes, limit).await?;
        self.coordinator
            .metrics()
            .received(Transfer::Update, bytes.len() as u64);
        let update = Weights::decode(&bytes)?;
        // The raw bytes are no longer needed: free them before folding.
        drop(bytes);
        self.coordinator
            .accept_update(site, &header, &update)
            .inspect_err(|e| tracing::warn!(%site, "update refused: {e}"))
    }
}

#[tonic::async_trait]
impl Federation for Services {
    async fn secure_aggregation(
        &self,
        request: Request<pb::SecAggRequest>,
    ) -> Result<Response<pb::SecAggReply>, Status> {
        let site = self.caller(&request, Role::Site)?;
        let _waiting = self.waiting.take(&site.to_string())?;
        let request = alveolus_privacy::wire::Request::try_from(request.into_inner())
            .map_err(CoordinatorError::from)?;
        let reply = self
            .coordinator
            .secure_step(&site.name, request)
            .await
            .inspect_err(
                |e| tracing::warn!(site = %site.name, "secure aggregation step refused: {e}"),
            )?;
        Ok(Response::new(reply.into()))
    }

    async fn report_validation(
        &self,
        request: Request<pb::ValidationReport>,
    ) -> Result<Response<pb::ValidationAck>, Status> {
        let site = self.caller(&request, Role::Site)?;
        let report =
            ValidationReport::try_from(request.into_inner()).map_err(CoordinatorError::from)?;
        self.coordinator
            .accept_validation(&site.name, report)
            .await
            .inspect_err(|e| tracing::warn!(site = %site.name, "validation refused: {e}"))?;
        Ok(Response::new(pb::ValidationAck {}))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let site = self.caller(&request, Role::Site)?;
        let certs = request.peer_certs();
        let expires = crate::tls::expiry(certs.as_deref().map(Vec::as_slice));
        let join = Join::try_from(request.into_inner()).map_err(CoordinatorError::from)?;
        let agent = join.protocol_version;
        if agent != PROTOCOL_VERSION {
            tracing::warn!(site = %site.name, agent, "refused agent with another protocol version");
            return Err(CoordinatorError::ProtocolVersion {
                agent,
                coordinator: PROTOCOL_VERSION,
            }
            .into());
        }
        let now = crate::clock::unix_ms() / 1000;
        let whose = format!("site {}'s", site.name);
        if let Some(warning) = expires.and_then(|e| expiry_warning(&whose, e, now)) {
            tracing::warn!(site = %site.name, "{warning}");
        }
        self.coordinator.join(&site.name, expires);
        tracing::info!(site = %site.name, agent_version = %join.agent_version, "site joined");
        Ok(Response::new(pb::JoinResponse {
            protocol_version: PROTOCOL_VERSION,
            site: site.name,
            project: site.project,
        }))
    }

    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let site = self.caller(&request, Role::Site)?;
        let _waiting = self.waiting.take(&site.to_string())?;
        let wait = Duration::from_secs(request.get_ref().wait_seconds.into());
        let task = self.coordinator.next_task(&site.name, wait).await;
        Ok(Response::new(task.into()))
    }

    type PullModelStream = ResponseStream<pb::ModelChunk>;

    async fn pull_model(
        &self,
        request: Request<pb::PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        let site = self.caller(&request, Role::Site)?;
        Ok(Response::new(
            self.model_stream(&site, &request.get_ref().version)?,
        ))
    }

    async fn push_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::PushUpdateResponse>, Status> {
        let site = self.caller(&request, Role::Site)?;
        let started = std::time::Instant::now();
        let outcome = self
            .receive_and_fold(&site.name, request.into_inner())
            .await;
        let metrics = self.coordinator.metrics();
        match &outcome {
            Ok(_) => metrics.update_accepted(&site.name, started.elapsed()),
            Err(e) => metrics.update_refused(&site.name, e, started.elapsed()),
        }
        Ok(Response::new(pb::PushUpdateResponse {
            reports_this_round: outcome? as u32,
        }))
    }
}

#[tonic::async_trait]
impl Admin for Services {
    async fn start_run(
        &self,
        request: Request<Streaming<pb::StartRunChunk>>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let admin = self.caller(&request, Role::Admin)?;
        let mut stream = request.into_inner();
        let config = receive_header(&mut stream)
            .await
            .map_err(CoordinatorError::from)?;
        let total_bytes = config.initial_model_bytes;
        let config = RunConfig::try_from(config).map_err(CoordinatorError::from)?;
        let upload = self.coordinator.start_upload(&admin.name).await?;
        let bytes = receive_bounded(
            stream,
            &upload,
            total_bytes,
            self.coordinator.max_model_bytes(),
        )
        .await?;
        drop(upload);
        self.coordinator
            .metrics()
            .received(Transfer::InitialModel, bytes.len() as u64);
        let info = self.coordinator.start_run(config, &bytes).await?;
        tracing::info!(admin = %admin.name, run = %info.run_id, "run started by admin");
        Ok(Response::new(info.into()))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        self.caller(&request, Role::Admin)?;
        Ok(Response::new(
            self.coordinator.run(&request.get_ref().run_id)?.into(),
        ))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        self.caller(&request, Role::Admin)?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: self
                .coordinator
                .runs()
                .into_iter()
                .map(Into::into)
                .collect(),
        }))
    }

    type WatchRunStream = ResponseStream<pb::RunEvent>;

    async fn watch_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        self.caller(&request, Role::Admin)?;
        let events = self.coordinator.watch(&request.get_ref().run_id)?;
        Ok(Response::new(Box::pin(events.map(|e| Ok(e.into())))))
    }

    async fn abort_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let admin = self.caller(&request, Role::Admin)?;
        let info = self.coordinator.abort(&request.get_ref().run_id).await?;
        tracing::info!(admin = %admin.name, run = %info.run_id, "abort requested");
        Ok(Response::new(info.into()))
    }

    async fn list_sites(
        &self,
        request: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        self.caller(&request, Role::Admin)?;
        Ok(Response::new(pb::ListSitesResponse {
            sites: self
                .coordinator
                .sites()
                .into_iter()
                .map(Into::into)
                .collect(),
        }))
    }

    type PullModelStream = ResponseStream<pb::ModelChunk>;

    async fn pull_model(
        &self,
        request: Request<pb::PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        let admin = self.caller(&request, Role::Admin)?;
        Ok(Response::new(
            self.model_stream(&admin, &request.get_ref().version)?,
        ))
    }
}
