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
    /// Client-level differential privacy; None: updates are averaged as they are.
    #[serde(default)]
    pub privacy: Option<PrivacyConfig>,
    #[serde(default)]
    pub aggregation: AggregationConfig,
    /// Secure aggregation; None: the coordinator sees each site's update.
    #[serde(default)]
    pub secure_aggregation: Option<SecureAggregationConfig>,
}

/// Secure aggregation (Bonawitz et al. 2017): the coordinator learns only the sum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationConfig {
    /// Sites that must survive a round to the end for it to be unmasked; also how many would
    /// have to collude with the coordinator to unmask one site.
    pub threshold: u32,
}

/// Shamir shares over GF(256) are numbered 1..=255: no roster can be larger.
pub const MAX_SECURE_SITES: u32 = 255;

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            rounds: 5,
            min_sites: 1,
            deadline_seconds: 600,
            training: TrainingConfig::default(),
            privacy: None,
            aggregation: AggregationConfig::default(),
            secure_aggregation: None,
        }
    }
}

/// DP-FedAvg (McMahan et al. 2018): each site clips its update to `clip_norm` (L2); the
/// coordinator averages them with equal weight and adds Gaussian noise of standard deviation
/// `noise_multiplier x clip_norm` to their sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    /// The δ at which ε is reported.
    pub delta: f64,
    /// The run stops before a round would take ε above this.
    pub epsilon_budget: Option<f64>,
}

impl PrivacyConfig {
    pub fn validate(&self) -> Result<(), DomainError> {
        require_positive("clip_norm", self.clip_norm)?;
        require_non_negative("noise_multiplier", self.noise_multiplier)?;
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(invalid("delta", format!("{} is not in (0, 1)", self.delta)));
        }
        if let Some(budget) = self.epsilon_budget {
            require_positive("epsilon_budget", budget)?;
        }
        Ok(())
    }
}

/// How a round's updates become one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum AggregationRule {
    /// Sample-weighted mean, folded in as updates arrive (memory: one model).
    #[default]
    FedAvg,
    /// Coordinate-wise median: one hostile site cannot move a coordinate past the honest ones.
    Median,
    /// Coordinate-wise mean after dropping the `trim_fraction` highest and lowest values.
    TrimmedMean { trim_fraction: f64 },
}

// No `deny_unknown_fields`: serde cannot combine it with `flatten`, and this is only read
// back from the coordinator's own manifests and run log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AggregationConfig {
    #[serde(flatten)]
    pub rule: AggregationRule,
    /// Updates whose L2 norm exceeds this are refused (a faulty or hostile site).
    pub norm_bound: Option<f64>,
}

impl AggregationConfig {
    pub fn validate(&self) -> Result<(), DomainError> {
        if let AggregationRule::TrimmedMean { trim_fraction } = self.rule
            && !(0.0..0.5).contains(&trim_fraction)
        {
            return Err(invalid(
                "trim_fraction",
                format!("{trim_fraction} is not in [0, 0.5)"),
            ));
        }
        if let Some(bound) = self.norm_bound {
            require_positive("norm_bound", bound)?;
        }
        Ok(())
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
        self.aggregation.validate()?;
        if let Some(privacy) = &self.privacy {
            privacy.validate()?;
            // The privacy analysis bounds one site's influence on a sum; a median or trimmed
            // mean is not that sum.
            if self.aggregation.rule != AggregationRule::FedAvg {
                return Err(invalid(
                    "aggregation",
                    "differential privacy needs FedAvg aggregation",
                ));
            }
        }
        if let Some(secure) = &self.secure_aggregation {
            check_threshold(secure.threshold)?;
            // Masked updates can only be summed: no median, no norm to check.
            if self.aggregation.rule != AggregationRule::FedAvg {
                return Err(invalid(
                    "aggregation",
                    "secure aggregation needs FedAvg aggregation (a median needs every update)",
                ));
            }
            if self.aggregation.norm_bound.is_some() {
                return Err(invalid(
                    "aggregation.norm_bound",
                    "the coordinator cannot check a masked update's norm; use --dp-clip, which sites apply",
                ));
            }
        }
        self.training.validate()
    }
}

/// What a site must do for a securely aggregated round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureTask {
    pub threshold: u32,
    /// Standard deviation of the Gaussian noise the site adds (its share of the DP noise).
    pub noise_std: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainTask {
    pub run_id: String,
    pub round: u32,
    pub model_version: String,
    pub training: TrainingConfig,
    /// L2 norm the site clips its update to (differential privacy).
    pub clip_norm: Option<f64>,
    pub secure_aggregation: Option<SecureTask>,
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
    /// The data is a masked update (secure aggregation): sample count and metrics travel
    /// masked inside it, and are zero here.
    pub masked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Completed,
    Aborted,
    /// A round could not finish (e.g. too few sites survived secure aggregation).
    Failed,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Completed => "completed",
            RunState::Aborted => "aborted",
            RunState::Failed => "failed",
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
    /// ε the run has spent after this round, at the run's δ (differential privacy).
    #[serde(default)]
    pub epsilon: Option<f64>,
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
    /// Why the run ended before its last round, e.g. its privacy budget.
    #[serde(default)]
    pub stop_reason: Option<String>,
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
            privacy: c.privacy.map(|p| pb::PrivacyConfig {
                clip_norm: p.clip_norm,
                noise_multiplier: p.noise_multiplier,
                delta: p.delta,
                epsilon_budget: p.epsilon_budget.unwrap_or(0.0),
            }),
            aggregation: Some(pb::AggregationConfig {
                rule: match c.aggregation.rule {
                    AggregationRule::FedAvg => pb::AggregationRule::Fedavg,
                    AggregationRule::Median => pb::AggregationRule::Median,
                    AggregationRule::TrimmedMean { .. } => pb::AggregationRule::TrimmedMean,
                } as i32,
                trim_fraction: match c.aggregation.rule {
                    AggregationRule::TrimmedMean { trim_fraction } => trim_fraction,
                    _ => 0.0,
                },
                norm_bound: c.aggregation.norm_bound.unwrap_or(0.0),
            }),
            secure_aggregation: c.secure_aggregation.map(|s| pb::SecureAggregationConfig {
                threshold: s.threshold,
            }),
        }
    }
}

fn require_positive(field: &'static str, value: f64) -> Result<(), DomainError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} is not a positive number")))
    }
}

fn require_non_negative(field: &'static str, value: f64) -> Result<(), DomainError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} is not a non-negative number"),
        ))
    }
}

/// Secure aggregation needs at least two sites to hide one, and GF(256) shares allow 255.
fn check_threshold(threshold: u32) -> Result<(), DomainError> {
    if (2..=MAX_SECURE_SITES).contains(&threshold) {
        Ok(())
    } else {
        Err(invalid(
            "secure_aggregation.threshold",
            format!("{threshold} is not between 2 and {MAX_SECURE_SITES}"),
        ))
    }
}

/// Protobuf's "unset" for an optional positive number.
fn positive(value: f64) -> Option<f64> {
    (value != 0.0).then_some(value)
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
            privacy: c.privacy.map(|p| PrivacyConfig {
                clip_norm: p.clip_norm,
                noise_multiplier: p.noise_multiplier,
                delta: p.delta,
                epsilon_budget: positive(p.epsilon_budget),
            }),
            aggregation: match c.aggregation {
                None => AggregationConfig::default(),
                Some(a) => AggregationConfig {
                    rule: match pb::AggregationRule::try_from(a.rule) {
                        Ok(pb::AggregationRule::Fedavg) => AggregationRule::FedAvg,
                        Ok(pb::AggregationRule::Median) => AggregationRule::Median,
                        Ok(pb::AggregationRule::TrimmedMean) => AggregationRule::TrimmedMean {
                            trim_fraction: a.trim_fraction,
                        },
                        Err(_) => {
                            return Err(invalid(
                                "aggregation.rule",
                                format!("unknown rule {}", a.rule),
                            ));
                        }
                    },
                    norm_bound: positive(a.norm_bound),
                },
            },
            secure_aggregation: c.secure_aggregation.map(|s| SecureAggregationConfig {
                threshold: s.threshold,
            }),
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
                clip_norm: t.clip_norm.unwrap_or(0.0),
                secure_aggregation: t.secure_aggregation.map(|s| pb::SecureAggregationTask {
                    threshold: s.threshold,
                    noise_std: s.noise_std.unwrap_or(0.0),
                }),
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
                    clip_norm: match t.clip_norm {
                        0.0 => None,
                        c if c.is_finite() && c > 0.0 => Some(c),
                        c => return Err(invalid("clip_norm", format!("{c} is not positive"))),
                    },
                    secure_aggregation: match t.secure_aggregation {
                        None => None,
                        Some(s) => {
                            check_threshold(s.threshold)?;
                            require_non_negative("secure_aggregation.noise_std", s.noise_std)?;
                            Some(SecureTask {
                                threshold: s.threshold,
                                noise_std: positive(s.noise_std),
                            })
                        }
                    },
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
            metrics: (!h.masked).then(|| h.metrics.into()),
            total_bytes: h.total_bytes,
            masked: h.masked,
        }
    }
}

impl TryFrom<pb::UpdateHeader> for UpdateHeader {
    type Error = DomainError;
    fn try_from(h: pb::UpdateHeader) -> Result<Self, DomainError> {
        validate_version(&h.base_version)?;
        if h.masked {
            if h.num_samples != 0 || h.metrics.is_some() {
                return Err(invalid(
                    "masked",
                    "a masked update carries its sample count and metrics masked, not in the header",
                ));
            }
            return Ok(Self {
                run_id: h.run_id,
                round: h.round,
                base_version: h.base_version,
                num_samples: 0,
                metrics: Metrics::default(),
                total_bytes: h.total_bytes,
                masked: true,
            });
        }
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
            masked: false,
        })
    }
}

impl From<RunState> for pb::RunState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Running => pb::RunState::Running,
            RunState::Completed => pb::RunState::Completed,
            RunState::Aborted => pb::RunState::Aborted,
            RunState::Failed => pb::RunState::Failed,
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
            epsilon: r.epsilon.unwrap_or(0.0),
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
            epsilon: positive(r.epsilon),
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
            stop_reason: r.stop_reason.unwrap_or_default(),
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
            Ok(pb::RunState::Failed) => RunState::Failed,
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
            stop_reason: (!r.stop_reason.is_empty()).then_some(r.stop_reason),
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
    fn aggregation_settings_read_back_from_json() {
        for rule in [
            AggregationRule::FedAvg,
            AggregationRule::Median,
            AggregationRule::TrimmedMean { trim_fraction: 0.2 },
        ] {
            let config = AggregationConfig {
                rule,
                norm_bound: Some(3.0),
            };
            let json = serde_json::to_string(&config).unwrap();
            assert_eq!(
                serde_json::from_str::<AggregationConfig>(&json).unwrap(),
                config
            );
        }
    }

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
            masked: false,
        };
        assert!(UpdateHeader::try_from(good.clone()).is_ok());
        // A masked update must not show its sample count or metrics.
        let mut masked = good.clone();
        masked.masked = true;
        assert!(UpdateHeader::try_from(masked.clone()).is_err());
        masked.num_samples = 0;
        masked.metrics = None;
        assert!(UpdateHeader::try_from(masked).unwrap().masked);
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
