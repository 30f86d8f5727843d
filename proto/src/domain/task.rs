//! What a site is asked to do in a round, and what it sends back with its update.

use serde::{Deserialize, Serialize};

use super::config::check_threshold;
use super::{
    DomainError, EvaluateTask, TrainingConfig, invalid, positive, require_non_negative,
    validate_version,
};
use crate::pb;
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
    Evaluate(EvaluateTask),
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
    /// How long the site's local training took, when it says (not for masked updates).
    pub train_seconds: Option<f64>,
}

/// The longest local training a header may claim: a week.
pub const MAX_TRAIN_SECONDS: f64 = 7.0 * 86_400.0;

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
            Task::Evaluate(t) => pb::task::Kind::Evaluate(t.into()),
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
            pb::task::Kind::Evaluate(t) => Ok(Task::Evaluate(t.try_into()?)),
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

/// The most samples one update may stand for: far above any site's slices, and low enough
/// that the sum over 2^31 sites, and every sample-weighted sum, stays exact in a u64 and finite
/// in an f64.
pub const MAX_SAMPLES: u64 = 1 << 32;

/// The largest mean training loss a site may report. The loss is cross-entropy plus soft Dice
/// on f32 probabilities, so above about 105 it means a broken model, not a bad round; the bound
/// keeps every sample-weighted mean of losses finite.
pub const MAX_LOSS: f64 = 1e6;

impl TryFrom<pb::Metrics> for Metrics {
    type Error = DomainError;
    fn try_from(m: pb::Metrics) -> Result<Self, DomainError> {
        if !(0.0..=MAX_LOSS).contains(&m.loss) {
            return Err(invalid(
                "metrics.loss",
                format!("{} is not in [0, {MAX_LOSS:e}]", m.loss),
            ));
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
            train_seconds: h.train_seconds.unwrap_or(0.0),
        }
    }
}

impl TryFrom<pb::UpdateHeader> for UpdateHeader {
    type Error = DomainError;
    fn try_from(h: pb::UpdateHeader) -> Result<Self, DomainError> {
        validate_version(&h.base_version)?;
        if h.masked {
            if h.num_samples != 0 || h.metrics.is_some() || h.train_seconds != 0.0 {
                return Err(invalid(
                    "masked",
                    "a masked update carries its sample count and metrics masked, and no training time, not in the header",
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
                train_seconds: None,
            });
        }
        if h.num_samples == 0 {
            return Err(invalid(
                "num_samples",
                "an update must come from at least one sample",
            ));
        }
        if h.num_samples > MAX_SAMPLES {
            return Err(invalid(
                "num_samples",
                format!("{} is above the limit of {MAX_SAMPLES}", h.num_samples),
            ));
        }
        if !(0.0..=MAX_TRAIN_SECONDS).contains(&h.train_seconds) {
            return Err(invalid(
                "train_seconds",
                format!(
                    "{} is not a training time from 0 to {MAX_TRAIN_SECONDS} seconds",
                    h.train_seconds
                ),
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
            train_seconds: positive(h.train_seconds),
        })
    }
}

/// What an agent says of itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub protocol_version: u32,
    /// Only ever logged: short, printable ASCII, so that it cannot forge a log line.
    pub agent_version: String,
}

/// The longest agent version a coordinator takes (`0.4.0-rc.1+build.2` is 18).
pub const MAX_AGENT_VERSION: usize = 64;

impl TryFrom<pb::JoinRequest> for Join {
    type Error = DomainError;
    fn try_from(j: pb::JoinRequest) -> Result<Self, DomainError> {
        if j.agent_version.len() > MAX_AGENT_VERSION {
            return Err(invalid(
                "agent_version",
                format!(
                    "{} bytes, more than {MAX_AGENT_VERSION}",
                    j.agent_version.len()
                ),
            ));
        }
        if !j.agent_version.chars().all(|c| c.is_ascii_graphic()) {
            return Err(invalid(
                "agent_version",
                "only printable ASCII without spaces is taken",
            ));
        }
        Ok(Self {
            protocol_version: j.protocol_version,
            agent_version: j.agent_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            train_seconds: 12.5,
        };
        assert_eq!(
            UpdateHeader::try_from(good.clone()).unwrap().train_seconds,
            Some(12.5)
        );
        for seconds in [-1.0, f64::NAN, f64::INFINITY, 1e9] {
            let bad = pb::UpdateHeader {
                train_seconds: seconds,
                ..good.clone()
            };
            assert!(UpdateHeader::try_from(bad).is_err(), "{seconds}");
        }
        // A masked update must not show its sample count or metrics.
        let mut masked = good.clone();
        masked.masked = true;
        assert!(UpdateHeader::try_from(masked.clone()).is_err());
        masked.num_samples = 0;
        masked.metrics = None;
        assert!(
            UpdateHeader::try_from(masked.clone()).is_err(),
            "training time"
        );
        masked.train_seconds = 0.0;
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
        for (loss, dice) in [
            (1.7e308, 0.2),
            (-1.0, 0.2),
            (f64::INFINITY, 0.2),
            (0.5, 1.5),
        ] {
            let mut bad = good.clone();
            bad.metrics = Some(pb::Metrics { loss, dice });
            assert!(
                UpdateHeader::try_from(bad).is_err(),
                "loss {loss}, dice {dice}"
            );
        }
        for samples in [0, MAX_SAMPLES + 1, 1 << 63] {
            let mut bad = good.clone();
            bad.num_samples = samples;
            assert!(UpdateHeader::try_from(bad).is_err(), "{samples} samples");
        }
        let mut most = good;
        most.num_samples = MAX_SAMPLES;
        assert!(UpdateHeader::try_from(most).is_ok());
    }

    #[test]
    fn an_agent_version_is_short_printable_ascii() {
        let join = |agent_version: &str| {
            Join::try_from(pb::JoinRequest {
                protocol_version: 1,
                agent_version: agent_version.into(),
            })
        };
        assert!(join("0.4.0-rc.1+build.2").is_ok());
        for bad in [
            "1.0\nERROR forged",
            "1.0 x",
            "1.0\u{1b}[2J",
            "é",
            &"9".repeat(65),
        ] {
            assert!(join(bad).is_err(), "{bad:?}");
        }
    }
}
