//! The agent's gRPC edge: joining, long-polling for tasks, pulling models (size, digest and
//! version checked by `transfer::receive_model`), pushing updates, counting what a round sends and receives, and the one reading of what a coordinator's
//! refusal means for the agent ([`verdict`]).

use alveolus_proto::PROTOCOL_VERSION;
use alveolus_proto::domain::{Task, UpdateHeader, ValidationReport};
use alveolus_proto::pb::{self, federation_client::FederationClient};
use alveolus_proto::transfer::{ModelReceiveError, ReceiveError, framed, receive_model};
use alveolus_proto::weights::Weights;
use tonic::Code;
use tonic::transport::Channel;

use crate::error::AgentError;

/// What a refused or failed call means for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The coordinator will not change its mind (this site's certificate is refused): stop.
    Fatal,
    /// This round goes on without this site (it moved on, the site already reported, or the
    /// coordinator refused what was sent): wait for the next task.
    SkipRound,
    /// The coordinator or the network is away: reconnect and try again.
    Retry,
}

/// The one reading of a status, for every call the agent makes.
pub fn verdict(status: &tonic::Status) -> Verdict {
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => Verdict::Fatal,
        Code::FailedPrecondition | Code::AlreadyExists | Code::NotFound | Code::InvalidArgument => {
            Verdict::SkipRound
        }
        _ => Verdict::Retry,
    }
}

/// A status that ends the session: fatal ones stop the agent, others make it reconnect.
pub fn status_error(status: tonic::Status) -> AgentError {
    match verdict(&status) {
        Verdict::Fatal => AgentError::Refused(status.message().to_string()),
        Verdict::SkipRound | Verdict::Retry => {
            AgentError::Rpc(format!("{:?}: {}", status.code(), status.message()))
        }
    }
}

/// A connection to the coordinator's Federation service.
pub type Federation = FederationClient<Channel>;

/// Who the coordinator says this agent is, read from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub site: String,
    pub project: String,
}

/// Introduces the agent: both ends must speak the same protocol version.
pub async fn join(client: &mut Federation) -> Result<Joined, AgentError> {
    client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            Joined {
                site: r.site,
                project: r.project,
            }
        })
        .map_err(|s| match s.code() {
            // The only precondition of Join: both ends speak the same protocol version.
            tonic::Code::FailedPrecondition => AgentError::Refused(s.message().to_string()),
            _ => status_error(s),
        })
}

/// Long-polls for this site's next task, held up to `wait_seconds` by the coordinator.
pub async fn next_task(client: &mut Federation, wait_seconds: u32) -> Result<Task, AgentError> {
    let task = client
        .next_task(pb::NextTaskRequest { wait_seconds })
        .await
        .map_err(status_error)?
        .into_inner();
    Task::try_from(task).map_err(|e| AgentError::Rpc(e.to_string()))
}

/// Sends what the site measured of a round's model on its validation cases.
pub async fn report_validation(
    client: &mut Federation,
    report: ValidationReport,
) -> Result<(), tonic::Status> {
    client
        .report_validation(pb::ValidationReport::from(report))
        .await?;
    Ok(())
}

/// Protocol bytes (protobuf-encoded messages, before HTTP/2 and TLS framing) of one round's
/// update and secure-aggregation steps; the model download, the same for every round, is not
/// counted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// Streams an update (plain or masked) as header, chunks and digest; returns the number of
/// reports the round has so far.
pub async fn push_update(
    client: &mut Federation,
    header: UpdateHeader,
    bytes: &bytes::Bytes,
    traffic: &mut Traffic,
) -> Result<u32, tonic::Status> {
    use prost::Message;
    let messages: Vec<pb::UpdateChunk> = framed(header.into(), bytes);
    traffic.sent += messages.iter().map(|m| m.encoded_len() as u64).sum::<u64>();
    Ok(client
        .push_update(futures::stream::iter(messages))
        .await?
        .into_inner()
        .reports_this_round)
}

/// Downloads a model version and checks size, digest and that the digest is the version.
/// Returns the model and its size in bytes.
pub async fn pull_model(
    client: &mut Federation,
    version: &str,
) -> Result<(Weights, u64), AgentError> {
    let stream = client
        .pull_model(pb::PullModelRequest {
            version: version.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let (_, bytes) = receive_model(stream, version).await.map_err(|e| match e {
        ModelReceiveError::Receive(ReceiveError::Stream(status)) => status_error(status),
        e => AgentError::Transfer(e.to_string()),
    })?;
    let weights = Weights::decode(&bytes).map_err(|e| AgentError::Transfer(e.to_string()))?;
    Ok((weights, bytes.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_skip_the_round_outages_retry_and_a_refused_certificate_stops() {
        let cases = [
            (tonic::Status::permission_denied("revoked"), Verdict::Fatal),
            (
                tonic::Status::unauthenticated("no certificate"),
                Verdict::Fatal,
            ),
            (
                tonic::Status::failed_precondition("round 2 in progress"),
                Verdict::SkipRound,
            ),
            (
                tonic::Status::already_exists("already reported"),
                Verdict::SkipRound,
            ),
            (
                tonic::Status::invalid_argument("not finite"),
                Verdict::SkipRound,
            ),
            (
                tonic::Status::unavailable("connection refused"),
                Verdict::Retry,
            ),
            (tonic::Status::internal("disk full"), Verdict::Retry),
        ];
        for (status, expected) in cases {
            assert_eq!(verdict(&status), expected, "{status:?}");
        }
        assert!(matches!(
            status_error(tonic::Status::permission_denied("revoked")),
            AgentError::Refused(_)
        ));
    }
}
