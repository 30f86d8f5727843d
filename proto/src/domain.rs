//! Domain types of the protocol, and their conversions from and to the generated `pb` types.
//!
//! Conversions from `pb` check what protobuf cannot express (required sub-messages, value
//! ranges) so that code past the edge only ever sees valid values.

use serde::{Deserialize, Serialize};

use crate::pb;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("message field `{0}` is missing")]
    Missing(&'static str),
    #[error("invalid value for `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DomainError {
    DomainError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Checks a model version string: lower-case hex sha256.
pub fn validate_version(version: &str) -> Result<(), DomainError> {
    if version.len() == 64
        && version
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(invalid(
            "version",
            format!("`{version}` is not a sha256 in lower-case hex"),
        ))
    }
}

/// What each site does locally in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    /// Seeds shuffling and augmentation, so a run can be repeated.
    pub seed: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            local_epochs: 2,
            learning_rate: 2e-3,
            batch_size: 4,
            seed: 0,
        }
    }
}

impl TrainingConfig {
    pub fn validate(&self) -> Result<(), DomainError> {
        if self.local_epochs == 0 || self.local_epochs > 1000 {
            return Err(invalid("local_epochs", "must be between 1 and 1000"));
        }
        if !(self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && self.learning_rate < 10.0)
        {
            return Err(invalid(
                "learning_rate",
                format!("{} is not in (0, 10)", self.learning_rate),
            ));
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return Err(invalid("batch_size", "must be between 1 and 4096"));
        }
        Ok(())
    }
}

/// A federated run as a researcher configures it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub rounds: u32,
    /// Fewest site updates a round may be aggregated from.
    pub min_sites: u32,
    /// After this many seconds a round closes with whatever reached `min_sites`, so a site that
    /// vanished does not stall the run.
    pub deadline_seconds: u32,
    pub training: TrainingConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            rounds: 5,
            min_sites: 1,
            deadline_seconds: 600,
            training: TrainingConfig::default(),
        }
    }
}

impl RunConfig {
    pub fn validate(&self) -> Result<(), DomainError> {
        if self.rounds == 0 || self.rounds > 100_000 {
            return Err(invalid("rounds", "must be between 1 and 100000"));
        }
        if self.min_sites == 0 {
            return Err(invalid("min_sites", "must be at least 1"));
        }
        if self.deadline_seconds == 0 {
            return Err(invalid("deadline_seconds", "must be at least 1"));
        }
        self.training.validate()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainTask {
    pub run_id: String,
    pub round: u32,
    pub model_version: String,
    pub training: TrainingConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    Wait { retry_after_ms: u32 },
    Train(TrainTask),
}

/// Aggregate training metrics a site reports: never anything per image or per patient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f64,
    pub dice: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpdateHeader {
    pub run_id: String,
    pub round: u32,
    pub base_version: String,
    pub num_samples: u64,
    pub metrics: Metrics,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Completed,
    Aborted,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Completed => "completed",
            RunState::Aborted => "aborted",
        }
    }
}

/// One finished round, as recorded in the run log and the checkpoint manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u32,
    /// The global model this round produced.
    pub version: String,
    pub sites: Vec<String>,
    pub samples: u64,
    /// Sample-weighted mean of the sites' local training loss.
    pub loss: f64,
    /// Sample-weighted mean of the sites' local training Dice.
    pub dice: f64,
    pub finished_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub state: RunState,
    pub config: RunConfig,
    pub initial_version: String,
    pub rounds: Vec<RoundSummary>,
    pub reported: Vec<String>,
    pub started_unix_ms: i64,
}

impl RunInfo {
    /// The newest global model of the run.
    pub fn latest_version(&self) -> &str {
        self.rounds
            .last()
            .map(|r| r.version.as_str())
            .unwrap_or(&self.initial_version)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    RoundStarted { round: u32, model_version: String },
    UpdateAccepted { round: u32, site: String },
    RoundFinished(RoundSummary),
    RunFinished(RunInfo),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    pub last_contact_unix_ms: i64,
    /// Rounds each run aggregated an update of this site into.
    pub contributions: Vec<(String, Vec<u32>)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelHeader {
    pub version: String,
    pub total_bytes: u64,
    pub manifest_json: String,
}

// ---- conversions at the edge ----

impl From<TrainingConfig> for pb::TrainingConfig {
    fn from(c: TrainingConfig) -> Self {
        Self {
            local_epochs: c.local_epochs,
            learning_rate: c.learning_rate,
            batch_size: c.batch_size,
            seed: c.seed,
        }
    }
}

impl TryFrom<pb::TrainingConfig> for TrainingConfig {
    type Error = DomainError;
    fn try_from(c: pb::TrainingConfig) -> Result<Self, DomainError> {
        let c = Self {
            local_epochs: c.local_epochs,
            learning_rate: c.learning_rate,
            batch_size: c.batch_size,
            seed: c.seed,
        };
        c.validate()?;
        Ok(c)
    }
}

impl From<RunConfig> for pb::RunConfig {
    fn from(c: RunConfig) -> Self {
        Self {
            rounds: c.rounds,
            min_sites: c.min_sites,
            deadline_seconds: c.deadline_seconds,
            training: Some(c.training.into()),
            initial_model_bytes: 0,
        }
    }
}

impl TryFrom<pb::RunConfig> for RunConfig {
    type Error = DomainError;
    fn try_from(c: pb::RunConfig) -> Result<Self, DomainError> {
        let c = Self {
            rounds: c.rounds,
            min_sites: c.min_sites,
            deadline_seconds: c.deadline_seconds,
            training: c
                .training
                .ok_or(DomainError::Missing("training"))?
                .try_into()?,
        };
        c.validate()?;
        Ok(c)
    }
}

impl From<Task> for pb::Task {
    fn from(t: Task) -> Self {
        let kind = match t {
            Task::Wait { retry_after_ms } => pb::task::Kind::Wait(pb::Wait { retry_after_ms }),
            Task::Train(t) => pb::task::Kind::Train(pb::TrainTask {
                run_id: t.run_id,
                round: t.round,
                model_version: t.model_version,
                training: Some(t.training.into()),
            }),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = DomainError;
    fn try_from(t: pb::Task) -> Result<Self, DomainError> {
        match t.kind.ok_or(DomainError::Missing("kind"))? {
            pb::task::Kind::Wait(w) => Ok(Task::Wait {
                retry_after_ms: w.retry_after_ms,
            }),
            pb::task::Kind::Train(t) => {
                validate_version(&t.model_version)?;
                Ok(Task::Train(TrainTask {
                    run_id: t.run_id,
                    round: t.round,
                    model_version: t.model_version,
                    training: t
                        .training
                        .ok_or(DomainError::Missing("training"))?
                        .try_into()?,
                }))
            }
        }
    }
}

impl From<Metrics> for pb::Metrics {
    fn from(m: Metrics) -> Self {
        Self {
            loss: m.loss,
            dice: m.dice,
        }
    }
}

impl TryFrom<pb::Metrics> for Metrics {
    type Error = DomainError;
    fn try_from(m: pb::Metrics) -> Result<Self, DomainError> {
        if !m.loss.is_finite() {
            return Err(invalid("metrics.loss", "not finite"));
        }
        if !(0.0..=1.0).contains(&m.dice) {
            return Err(invalid(
                "metrics.dice",
                format!("{} is not in [0, 1]", m.dice),
            ));
        }
        Ok(Self {
            loss: m.loss,
            dice: m.dice,
        })
    }
}

impl From<UpdateHeader> for pb::UpdateHeader {
    fn from(h: UpdateHeader) -> Self {
        Self {
            run_id: h.run_id,
            round: h.round,
            base_version: h.base_version,
            num_samples: h.num_samples,
            metrics: Some(h.metrics.into()),
            total_bytes: h.total_bytes,
        }
    }
}

impl TryFrom<pb::UpdateHeader> for UpdateHeader {
    type Error = DomainError;
    fn try_from(h: pb::UpdateHeader) -> Result<Self, DomainError> {
        validate_version(&h.base_version)?;
        if h.num_samples == 0 {
            return Err(invalid(
                "num_samples",
                "an update must come from at least one sample",
            ));
        }
        Ok(Self {
            run_id: h.run_id,
            round: h.round,
            base_version: h.base_version,
            num_samples: h.num_samples,
            metrics: h
                .metrics
                .ok_or(DomainError::Missing("metrics"))?
                .try_into()?,
            total_bytes: h.total_bytes,
        })
    }
}

impl From<RunState> for pb::RunState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Running => pb::RunState::Running,
            RunState::Completed => pb::RunState::Completed,
            RunState::Aborted => pb::RunState::Aborted,
        }
    }
}

impl From<RoundSummary> for pb::RoundSummary {
    fn from(r: RoundSummary) -> Self {
        Self {
            round: r.round,
            version: r.version,
            sites: r.sites,
            samples: r.samples,
            loss: r.loss,
            dice: r.dice,
            finished_unix_ms: r.finished_unix_ms,
        }
    }
}

impl From<pb::RoundSummary> for RoundSummary {
    fn from(r: pb::RoundSummary) -> Self {
        Self {
            round: r.round,
            version: r.version,
            sites: r.sites,
            samples: r.samples,
            loss: r.loss,
            dice: r.dice,
            finished_unix_ms: r.finished_unix_ms,
        }
    }
}

impl From<RunInfo> for pb::RunInfo {
    fn from(r: RunInfo) -> Self {
        Self {
            run_id: r.run_id,
            state: pb::RunState::from(r.state) as i32,
            config: Some(r.config.into()),
            initial_version: r.initial_version,
            rounds: r.rounds.into_iter().map(Into::into).collect(),
            reported: r.reported,
            started_unix_ms: r.started_unix_ms,
        }
    }
}

impl TryFrom<pb::RunInfo> for RunInfo {
    type Error = DomainError;
    fn try_from(r: pb::RunInfo) -> Result<Self, DomainError> {
        let state = match pb::RunState::try_from(r.state) {
            Ok(pb::RunState::Running) => RunState::Running,
            Ok(pb::RunState::Completed) => RunState::Completed,
            Ok(pb::RunState::Aborted) => RunState::Aborted,
            _ => return Err(invalid("state", format!("unknown run state {}", r.state))),
        };
        Ok(Self {
            run_id: r.run_id,
            state,
            config: r.config.ok_or(DomainError::Missing("config"))?.try_into()?,
            initial_version: r.initial_version,
            rounds: r.rounds.into_iter().map(Into::into).collect(),
            reported: r.reported,
            started_unix_ms: r.started_unix_ms,
        })
    }
}

impl From<RunEvent> for pb::RunEvent {
    fn from(e: RunEvent) -> Self {
        use pb::run_event::Kind;
        let kind = match e {
            RunEvent::RoundStarted {
                round,
                model_version,
            } => Kind::RoundStarted(pb::RoundStarted {
                round,
                model_version,
            }),
            RunEvent::UpdateAccepted { round, site } => {
                Kind::UpdateAccepted(pb::UpdateAccepted { round, site })
            }
            RunEvent::RoundFinished(s) => Kind::RoundFinished(s.into()),
            RunEvent::RunFinished(r) => Kind::RunFinished(r.into()),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<pb::RunEvent> for RunEvent {
    type Error = DomainError;
    fn try_from(e: pb::RunEvent) -> Result<Self, DomainError> {
        use pb::run_event::Kind;
        Ok(match e.kind.ok_or(DomainError::Missing("kind"))? {
            Kind::RoundStarted(s) => RunEvent::RoundStarted {
                round: s.round,
                model_version: s.model_version,
            },
            Kind::UpdateAccepted(u) => RunEvent::UpdateAccepted {
                round: u.round,
                site: u.site,
            },
            Kind::RoundFinished(s) => RunEvent::RoundFinished(s.into()),
            Kind::RunFinished(r) => RunEvent::RunFinished(r.try_into()?),
        })
    }
}

impl From<SiteInfo> for pb::SiteInfo {
    fn from(s: SiteInfo) -> Self {
        Self {
            name: s.name,
            last_contact_unix_ms: s.last_contact_unix_ms,
            contributions: s
                .contributions
                .into_iter()
                .map(|(run_id, rounds)| pb::RunRounds { run_id, rounds })
                .collect(),
        }
    }
}

impl From<pb::SiteInfo> for SiteInfo {
    fn from(s: pb::SiteInfo) -> Self {
        Self {
            name: s.name,
            last_contact_unix_ms: s.last_contact_unix_ms,
            contributions: s
                .contributions
                .into_iter()
                .map(|r| (r.run_id, r.rounds))
                .collect(),
        }
    }
}

impl From<ModelHeader> for pb::ModelHeader {
    fn from(h: ModelHeader) -> Self {
        Self {
            version: h.version,
            total_bytes: h.total_bytes,
            manifest_json: h.manifest_json,
        }
    }
}

impl TryFrom<pb::ModelHeader> for ModelHeader {
    type Error = DomainError;
    fn try_from(h: pb::ModelHeader) -> Result<Self, DomainError> {
        validate_version(&h.version)?;
        Ok(Self {
            version: h.version,
            total_bytes: h.total_bytes,
            manifest_json: h.manifest_json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_config_round_trips_and_validates() {
        let c = RunConfig::default();
        let back = RunConfig::try_from(pb::RunConfig::from(c.clone())).unwrap();
        assert_eq!(back, c);
        let mut bad = pb::RunConfig::from(c);
        bad.min_sites = 0;
        assert!(matches!(
            RunConfig::try_from(bad),
            Err(DomainError::Invalid {
                field: "min_sites",
                ..
            })
        ));
        let mut bad = pb::RunConfig::from(RunConfig::default());
        bad.training = None;
        assert_eq!(
            RunConfig::try_from(bad),
            Err(DomainError::Missing("training"))
        );
    }

    #[test]
    fn update_header_refuses_bad_values() {
        let good = pb::UpdateHeader {
            run_id: "r".into(),
            round: 1,
            base_version: "a".repeat(64),
            num_samples: 3,
            metrics: Some(pb::Metrics {
                loss: 0.5,
                dice: 0.2,
            }),
            total_bytes: 10,
        };
        assert!(UpdateHeader::try_from(good.clone()).is_ok());
        let mut bad = good.clone();
        bad.base_version = "xyz".into();
        assert!(UpdateHeader::try_from(bad).is_err());
        let mut bad = good.clone();
        bad.metrics = Some(pb::Metrics {
            loss: f64::NAN,
            dice: 0.2,
        });
        assert!(UpdateHeader::try_from(bad).is_err());
        let mut bad = good;
        bad.num_samples = 0;
        assert!(UpdateHeader::try_from(bad).is_err());
    }
}
