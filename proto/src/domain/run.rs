//! What a run is while it goes: its state, its finished rounds, its events, and the sites.

use serde::{Deserialize, Serialize};

use super::{
    CrossSiteValidation, DomainError, LocalModel, RunConfig, SiteValidation, invalid, positive,
};
use crate::pb;
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
    /// Each site's own figures, by site name; empty under secure aggregation.
    #[serde(default)]
    pub site_reports: Vec<SiteReport>,
    /// What each site measured of this round's model on its own validation cases, in the
    /// order the reports arrived (after the round: the sites measure the model it made).
    #[serde(default)]
    pub validation: Vec<SiteValidation>,
}

/// One site's part in a round: what its update header said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    pub site: String,
    pub samples: u64,
    /// The site's local training loss and Dice on its own data.
    pub loss: f64,
    pub dice: f64,
    /// How long its local training took, when it said (not under DP).
    #[serde(default)]
    pub train_seconds: Option<f64>,
    /// Size of the update it sent.
    pub bytes: u64,
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
    /// What holds a running run up now (a checkpoint the coordinator cannot write and retries);
    /// cleared when the run goes on. Never stored: it is the coordinator's present, not history.
    #[serde(default)]
    pub held_up: Option<String>,
    /// Cross-site evaluation: each site's last local model, kept in the registry.
    #[serde(default)]
    pub local_models: Vec<LocalModel>,
    /// Cross-site evaluation: those models as measured at each site.
    #[serde(default)]
    pub cross_site: Vec<CrossSiteValidation>,
}

impl RoundSummary {
    /// The round's model's infection Dice over every validation case the sites reported on:
    /// each site's Dice weighted by its cases (a site that measured no infection, or had no
    /// case, adds nothing). None until a site with cases reported.
    pub fn validated_infection_dice(&self) -> Option<f64> {
        let (sum, cases) = self
            .validation
            .iter()
            .filter_map(|v| {
                let cases = f64::from(v.validation.cases);
                v.validation
                    .infection_dice
                    .filter(|_| cases > 0.0)
                    .map(|d| (d * cases, cases))
            })
            .fold((0.0, 0.0), |(s, n), (d, c)| (s + d, n + c));
        (cases > 0.0).then(|| sum / cases)
    }
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
    RoundStarted {
        round: u32,
        model_version: String,
    },
    UpdateAccepted {
        round: u32,
        site: String,
    },
    RoundFinished(RoundSummary),
    /// Boxed: a run's whole record is far larger than the other events.
    RunFinished(Box<RunInfo>),
    /// A site's validation of the model round `round` made arrived.
    SiteValidated {
        round: u32,
        validation: SiteValidation,
        /// Cross-site evaluation: the model was this site's last local model.
        model_of: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    pub last_contact_unix_ms: i64,
    /// Rounds each run aggregated an update of this site into.
    pub contributions: Vec<(String, Vec<u32>)>,
    /// When the certificate the site last joined with expires (Unix seconds): a site whose
    /// certificate lapses drops out of the federation, so its operator must hear of it first.
    #[serde(default)]
    pub certificate_expires_unix: Option<i64>,
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
            site_reports: r.site_reports.into_iter().map(Into::into).collect(),
            validation: r.validation.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<SiteReport> for pb::SiteReport {
    fn from(r: SiteReport) -> Self {
        Self {
            site: r.site,
            samples: r.samples,
            loss: r.loss,
            dice: r.dice,
            train_seconds: r.train_seconds.unwrap_or(0.0),
            bytes: r.bytes,
        }
    }
}

impl From<pb::SiteReport> for SiteReport {
    fn from(r: pb::SiteReport) -> Self {
        Self {
            site: r.site,
            samples: r.samples,
            loss: r.loss,
            dice: r.dice,
            train_seconds: positive(r.train_seconds),
            bytes: r.bytes,
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
            site_reports: r.site_reports.into_iter().map(Into::into).collect(),
            validation: r.validation.into_iter().map(Into::into).collect(),
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
            held_up: r.held_up.unwrap_or_default(),
            local_models: r.local_models.into_iter().map(Into::into).collect(),
            cross_site: r.cross_site.into_iter().map(Into::into).collect(),
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
            held_up: (!r.held_up.is_empty()).then_some(r.held_up),
            local_models: r.local_models.into_iter().map(Into::into).collect(),
            cross_site: r
                .cross_site
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, DomainError>>()?,
        })
    }
}

impl From<LocalModel> for pb::LocalModel {
    fn from(m: LocalModel) -> Self {
        Self {
            site: m.site,
            version: m.version,
        }
    }
}

impl From<pb::LocalModel> for LocalModel {
    fn from(m: pb::LocalModel) -> Self {
        Self {
            site: m.site,
            version: m.version,
        }
    }
}

impl From<CrossSiteValidation> for pb::CrossSiteValidation {
    fn from(c: CrossSiteValidation) -> Self {
        Self {
            model_of: c.model_of,
            model_version: c.model_version,
            validation: Some(c.validation.into()),
        }
    }
}

impl TryFrom<pb::CrossSiteValidation> for CrossSiteValidation {
    type Error = DomainError;
    fn try_from(c: pb::CrossSiteValidation) -> Result<Self, DomainError> {
        Ok(Self {
            model_of: c.model_of,
            model_version: c.model_version,
            validation: c
                .validation
                .ok_or(DomainError::Missing("cross_site.validation"))?
                .into(),
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
            RunEvent::RunFinished(r) => Kind::RunFinished((*r).into()),
            RunEvent::SiteValidated {
                round,
                validation,
                model_of,
            } => Kind::SiteValidated(pb::SiteValidated {
                round,
                validation: Some(validation.into()),
                model_of: model_of.unwrap_or_default(),
            }),
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
            Kind::RunFinished(r) => RunEvent::RunFinished(Box::new(r.try_into()?)),
            Kind::SiteValidated(v) => RunEvent::SiteValidated {
                round: v.round,
                validation: v
                    .validation
                    .ok_or(DomainError::Missing("validation"))?
                    .into(),
                model_of: (!v.model_of.is_empty()).then_some(v.model_of),
            },
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
            certificate_expires_unix: s.certificate_expires_unix.unwrap_or(0),
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
            certificate_expires_unix: (s.certificate_expires_unix != 0)
                .then_some(s.certificate_expires_unix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Validation;

    fn at(site: &str, cases: u32, infection_dice: Option<f64>) -> SiteValidation {
        SiteValidation {
            site: site.into(),
            validation: Validation {
                cases,
                infection_dice,
                classes: vec![],
            },
        }
    }

    #[test]
    fn a_rounds_validated_dice_weighs_each_site_by_its_cases() {
        let mut round = RoundSummary {
            round: 1,
            version: "a".repeat(64),
            sites: vec![],
            samples: 0,
            loss: 0.0,
            dice: 0.0,
            finished_unix_ms: 0,
            epsilon: None,
            site_reports: vec![],
            validation: vec![at("empty", 0, None)],
        };
        assert_eq!(round.validated_infection_dice(), None);
        round.validation.push(at("north", 3, Some(0.8)));
        round.validation.push(at("south", 1, Some(0.4)));
        round.validation.push(at("no lesion", 2, None));
        let mean = round.validated_infection_dice().unwrap();
        assert!((mean - 0.7).abs() < 1e-12, "{mean}");
    }
}
