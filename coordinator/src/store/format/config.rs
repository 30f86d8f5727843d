//! A run's configuration as the state folder stores it: the run log's `config` and the parts
//! of it a manifest repeats (aggregation, privacy, secure aggregation), mirrored field for field
//! with both conversions, as the rest of `format`.

use alveolus_proto::domain::{
    AggregationConfig, AggregationRule, LearningRateSchedule, Precision, PrivacyConfig, RunConfig,
    SecureAggregationConfig, ServerOptimizer, ServerOptimizerKind, Strategy, TrainingConfig,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub(super) struct ConfigV1 {
    rounds: u32,
    min_sites: u32,
    deadline_seconds: u32,
    training: TrainingV1,
    #[serde(default)]
    privacy: Option<PrivacyV1>,
    #[serde(default)]
    aggregation: AggregationV1,
    #[serde(default)]
    secure_aggregation: Option<SecureV1>,
    /// Added within format 1: absent in files written before schedules, and omitted when
    /// there is none, so such files read and are written as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule: Option<ScheduleV1>,
    /// Added within format 1, as `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_optimizer: Option<ServerOptimizerV1>,
    /// Added within format 1, written only when on: runs before it did not validate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    validate_at_sites: bool,
    /// Added within format 1, as `validate_at_sites`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cross_site_evaluation: bool,
}

/// A manifest's record of the run's strategy.
#[derive(Serialize, Deserialize, Clone, Copy)]
pub(super) struct StrategyV1 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule: Option<ScheduleV1>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_optimizer: Option<ServerOptimizerV1>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proximal_mu: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    site_normalisation: bool,
}

impl From<Strategy> for StrategyV1 {
    fn from(s: Strategy) -> Self {
        Self {
            schedule: s.schedule.map(Into::into),
            server_optimizer: s.server_optimizer.map(Into::into),
            proximal_mu: (s.proximal_mu > 0.0).then_some(s.proximal_mu),
            site_normalisation: s.site_normalisation,
        }
    }
}

impl From<StrategyV1> for Strategy {
    fn from(s: StrategyV1) -> Self {
        Self {
            schedule: s.schedule.map(Into::into),
            server_optimizer: s.server_optimizer.map(Into::into),
            proximal_mu: s.proximal_mu.unwrap_or(0.0),
            site_normalisation: s.site_normalisation,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy)]
pub(super) struct ServerOptimizerV1 {
    /// fedavgm, fedadagrad, fedadam or fedyogi.
    kind: ServerOptimizerKind,
    learning_rate: f64,
    beta1: f64,
    beta2: f64,
    tau: f64,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
pub(super) struct ScheduleV1 {
    warmup_rounds: u32,
    cosine: bool,
    final_fraction: f64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct TrainingV1 {
    local_epochs: u32,
    learning_rate: f64,
    batch_size: u32,
    seed: u64,
    /// Added within format 1, as `schedule`: FedProx's μ, written only when above 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proximal_mu: Option<f64>,
    /// Added within format 1, as `schedule`: FedBN, written only when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    site_normalisation: bool,
    /// Added within format 1, as `schedule`: mixed precision, written only when not f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    precision: Option<Precision>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
pub(super) struct PrivacyV1 {
    clip_norm: f64,
    noise_multiplier: f64,
    delta: f64,
    epsilon_budget: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Default)]
pub(super) struct AggregationV1 {
    #[serde(flatten)]
    rule: RuleV1,
    norm_bound: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub(super) enum RuleV1 {
    #[default]
    FedAvg,
    Median,
    TrimmedMean {
        trim_fraction: f64,
    },
}

#[derive(Serialize, Deserialize, Clone, Copy)]
pub(super) struct SecureV1 {
    threshold: u32,
}

impl From<&RunConfig> for ConfigV1 {
    fn from(c: &RunConfig) -> Self {
        let t = &c.training;
        Self {
            rounds: c.rounds,
            min_sites: c.min_sites,
            deadline_seconds: c.deadline_seconds,
            training: TrainingV1 {
                local_epochs: t.local_epochs,
                learning_rate: t.learning_rate,
                batch_size: t.batch_size,
                seed: t.seed,
                proximal_mu: (t.proximal_mu > 0.0).then_some(t.proximal_mu),
                site_normalisation: t.site_normalisation,
                precision: (t.precision != Precision::F32).then_some(t.precision),
            },
            privacy: c.privacy.as_ref().map(Into::into),
            aggregation: c.aggregation.into(),
            secure_aggregation: c.secure_aggregation.map(Into::into),
            schedule: c.schedule.map(Into::into),
            server_optimizer: c.server_optimizer.map(Into::into),
            validate_at_sites: c.validate_at_sites,
            cross_site_evaluation: c.cross_site_evaluation,
        }
    }
}

impl From<ConfigV1> for RunConfig {
    fn from(c: ConfigV1) -> Self {
        let t = c.training;
        Self {
            rounds: c.rounds,
            min_sites: c.min_sites,
            deadline_seconds: c.deadline_seconds,
            training: TrainingConfig {
                local_epochs: t.local_epochs,
                learning_rate: t.learning_rate,
                batch_size: t.batch_size,
                seed: t.seed,
                proximal_mu: t.proximal_mu.unwrap_or(0.0),
                site_normalisation: t.site_normalisation,
                precision: t.precision.unwrap_or_default(),
            },
            privacy: c.privacy.map(Into::into),
            aggregation: c.aggregation.into(),
            secure_aggregation: c.secure_aggregation.map(Into::into),
            schedule: c.schedule.map(Into::into),
            server_optimizer: c.server_optimizer.map(Into::into),
            validate_at_sites: c.validate_at_sites,
            cross_site_evaluation: c.cross_site_evaluation,
        }
    }
}

impl From<&PrivacyConfig> for PrivacyV1 {
    fn from(p: &PrivacyConfig) -> Self {
        Self {
            clip_norm: p.clip_norm,
            noise_multiplier: p.noise_multiplier,
            delta: p.delta,
            epsilon_budget: p.epsilon_budget,
        }
    }
}

impl From<PrivacyV1> for PrivacyConfig {
    fn from(p: PrivacyV1) -> Self {
        Self {
            clip_norm: p.clip_norm,
            noise_multiplier: p.noise_multiplier,
            delta: p.delta,
            epsilon_budget: p.epsilon_budget,
        }
    }
}

impl From<AggregationConfig> for AggregationV1 {
    fn from(a: AggregationConfig) -> Self {
        Self {
            rule: match a.rule {
                AggregationRule::FedAvg => RuleV1::FedAvg,
                AggregationRule::Median => RuleV1::Median,
                AggregationRule::TrimmedMean { trim_fraction } => {
                    RuleV1::TrimmedMean { trim_fraction }
                }
            },
            norm_bound: a.norm_bound,
        }
    }
}

impl From<AggregationV1> for AggregationConfig {
    fn from(a: AggregationV1) -> Self {
        Self {
            rule: match a.rule {
                RuleV1::FedAvg => AggregationRule::FedAvg,
                RuleV1::Median => AggregationRule::Median,
                RuleV1::TrimmedMean { trim_fraction } => {
                    AggregationRule::TrimmedMean { trim_fraction }
                }
            },
            norm_bound: a.norm_bound,
        }
    }
}

impl From<SecureAggregationConfig> for SecureV1 {
    fn from(s: SecureAggregationConfig) -> Self {
        Self {
            threshold: s.threshold,
        }
    }
}

impl From<SecureV1> for SecureAggregationConfig {
    fn from(s: SecureV1) -> Self {
        Self {
            threshold: s.threshold,
        }
    }
}
impl From<LearningRateSchedule> for ScheduleV1 {
    fn from(s: LearningRateSchedule) -> Self {
        Self {
            warmup_rounds: s.warmup_rounds,
            cosine: s.cosine,
            final_fraction: s.final_fraction,
        }
    }
}

impl From<ScheduleV1> for LearningRateSchedule {
    fn from(s: ScheduleV1) -> Self {
        Self {
            warmup_rounds: s.warmup_rounds,
            cosine: s.cosine,
            final_fraction: s.final_fraction,
        }
    }
}

impl From<ServerOptimizer> for ServerOptimizerV1 {
    fn from(o: ServerOptimizer) -> Self {
        Self {
            kind: o.kind,
            learning_rate: o.learning_rate,
            beta1: o.beta1,
            beta2: o.beta2,
            tau: o.tau,
        }
    }
}

impl From<ServerOptimizerV1> for ServerOptimizer {
    fn from(o: ServerOptimizerV1) -> Self {
        Self {
            kind: o.kind,
            learning_rate: o.learning_rate,
            beta1: o.beta1,
            beta2: o.beta2,
            tau: o.tau,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_is_kept_and_runs_from_before_it_read_as_f32() {
        let mut config = RunConfig::default();
        let plain = serde_json::to_string(&ConfigV1::from(&config)).unwrap();
        assert!(!plain.contains("precision"), "f32 is not written: {plain}");
        let back: RunConfig = serde_json::from_str::<ConfigV1>(&plain).unwrap().into();
        assert_eq!(back.training.precision, Precision::F32);
        config.training.precision = Precision::Bf16;
        let mixed = serde_json::to_string(&ConfigV1::from(&config)).unwrap();
        assert!(mixed.contains(r#""precision":"bf16""#), "{mixed}");
        let back: RunConfig = serde_json::from_str::<ConfigV1>(&mixed).unwrap().into();
        assert_eq!(back, config);
    }
}
