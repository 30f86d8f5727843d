//! Everything that can go wrong in the coordinator, and the one place it becomes a gRPC status.

use alveolus_proto::domain::DomainError;
use alveolus_proto::transfer::{ReceiveError, TransferError};
use alveolus_proto::weights::WeightsError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error(
        "incompatible protocol: the agent speaks version {agent}, this coordinator speaks version {coordinator}; upgrade the older side"
    )]
    ProtocolVersion { agent: u32, coordinator: u32 },
    #[error("no run is in progress")]
    NoActiveRun,
    #[error("run `{active}` is in progress; abort it before starting another")]
    RunInProgress { active: String },
    #[error("the update is for run `{got}`, but run `{expected}` is in progress")]
    WrongRun { got: String, expected: String },
    #[error("the update is for round {got}, but round {expected} is in progress")]
    WrongRound { got: u32, expected: u32 },
    #[error("round {round} is closing: it takes no more updates")]
    RoundClosing { round: u32 },
    #[error("the update was computed from model {got}, but this round started from {expected}")]
    WrongBase { got: String, expected: String },
    #[error("site `{site}` already reported for round {round}")]
    AlreadyReported { site: String, round: u32 },
    #[error(
        "the update of site `{site}` has L2 norm {norm:.4}, above this run's bound {bound:.4}; it is not used"
    )]
    UpdateNorm { site: String, norm: f64, bound: f64 },
    #[error("site `{site}`'s update for round {round} was refused; it takes part again next round")]
    RefusedThisRound { site: String, round: u32 },
    #[error("secure aggregation: {0}")]
    SecureAggregation(String),
    #[error("{0}")]
    Busy(&'static str),
    #[error("too many {what} open from this identity (at most {limit} at once)")]
    TooMany { what: &'static str, limit: usize },
    #[error("every upload slot stayed busy until round {round}'s deadline; try again")]
    NoUploadSlot { round: u32 },
    #[error("round {round} cannot make a model: {reason}")]
    Aggregation { round: u32, reason: String },
    #[error("no run `{0}`")]
    UnknownRun(String),
    #[error("no model version `{0}`")]
    UnknownVersion(String),
    #[error("invalid message: {0}")]
    Domain(#[from] DomainError),
    #[error("transfer refused: {0}")]
    Transfer(#[from] TransferError),
    #[error("weights refused: {0}")]
    Weights(#[from] WeightsError),
    #[error("malformed stream: {0}")]
    Stream(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("state storage: {0}")]
    Store(String),
}

impl From<ReceiveError> for CoordinatorError {
    fn from(error: ReceiveError) -> Self {
        match error {
            ReceiveError::Transfer(e) => CoordinatorError::Transfer(e),
            ReceiveError::Stream(status) => CoordinatorError::Stream(status.message().to_string()),
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Status {
        use CoordinatorError as E;
        let message = error.to_string();
        match error {
            E::Unauthenticated(_) => Status::unauthenticated(message),
            E::PermissionDenied(_) => Status::permission_denied(message),
            E::ProtocolVersion { .. }
            | E::NoActiveRun
            | E::RunInProgress { .. }
            | E::WrongRun { .. }
            | E::WrongRound { .. }
            | E::RoundClosing { .. }
            | E::WrongBase { .. }
            | E::UpdateNorm { .. }
            | E::RefusedThisRound { .. }
            | E::SecureAggregation(_)
            | E::Aggregation { .. } => Status::failed_precondition(message),
            E::AlreadyReported { .. } => Status::already_exists(message),
            E::TooMany { .. } => Status::resource_exhausted(message),
            E::NoUploadSlot { .. } | E::Busy(_) => Status::unavailable(message),
            E::UnknownRun(_) | E::UnknownVersion(_) => Status::not_found(message),
            E::Transfer(TransferError::DigestMismatch { .. }) => Status::data_loss(message),
            E::Domain(_) | E::Transfer(_) | E::Weights(_) | E::Stream(_) => {
                Status::invalid_argument(message)
            }
            E::Tls(_) | E::Store(_) => {
                tracing::error!("{message}");
                Status::internal(message)
            }
        }
    }
}
