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
    #[error("validation of round {round} of run `{run}` is not taken: {reason}")]
    ValidationRefused {
        run: String,
        round: u32,
        reason: &'static str,
    },
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

impl CoordinatorError {
    /// A short, fixed name for the metrics' `reason` label: one word per kind of refusal,
    /// never the message (which can hold numbers and names without bound).
    pub fn reason(&self) -> &'static str {
        use CoordinatorError as E;
        match self {
            E::Unauthenticated(_) => "unauthenticated",
            E::PermissionDenied(_) => "permission_denied",
            E::ProtocolVersion { .. } => "protocol_version",
            E::NoActiveRun => "no_active_run",
            E::RunInProgress { .. } => "run_in_progress",
            E::WrongRun { .. } => "wrong_run",
            E::WrongRound { .. } => "wrong_round",
            E::RoundClosing { .. } => "round_closing",
            E::WrongBase { .. } => "wrong_base",
            E::AlreadyReported { .. } => "already_reported",
            E::ValidationRefused { .. } => "validation_refused",
            E::UpdateNorm { .. } => "update_norm",
            E::RefusedThisRound { .. } => "refused_this_round",
            E::SecureAggregation(_) => "secure_aggregation",
            E::Busy(_) => "busy",
            E::TooMany { .. } => "too_many",
            E::NoUploadSlot { .. } => "no_upload_slot",
            E::Aggregation { .. } => "aggregation",
            E::UnknownRun(_) => "unknown_run",
            E::UnknownVersion(_) => "unknown_version",
            E::Domain(_) => "invalid_message",
            E::Transfer(_) => "transfer",
            E::Weights(_) => "weights",
            E::Stream(_) => "stream",
            E::Tls(_) => "tls",
            E::Store(_) => "store",
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
            | E::ValidationRefused { .. }
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
