//! Why the agent stopped or a session ended.

use std::path::PathBuf;

use alveolus_models::train::TrainError;
use alveolus_proto::kit::KitError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
    #[error("coordinator call failed: {0}")]
    Rpc(String),
    #[error("model transfer: {0}")]
    Transfer(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Training crashed: the same data and model would crash it again, so the agent stops.
    #[error("local training crashed: {0}; the agent stops rather than retrain into the same crash")]
    TrainingPanicked(String),
    #[error("{0}")]
    Device(#[from] alveolus_models::DeviceError),
    #[error("cannot write the audit copy {path}: {message}")]
    Audit { path: PathBuf, message: String },
    #[error("cannot write the site's own model {path}: {message}")]
    SiteModel { path: PathBuf, message: String },
}
