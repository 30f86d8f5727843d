//! How a researcher configures a run: local training, DP, aggregation, secure aggregation.

use serde::{Deserialize, Serialize};

use super::{
    DomainError, LearningRateSchedule, Precision, ServerOptimizer, invalid, positive,
    require_non_negative, require_positive,
};
use crate::pb;
/// What each site does locally in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    /// Seeds shuffling and augmentation, so a run can be repeated.
    pub seed: u64,
    /// FedProx (Li et al. 2020): sites add μ/2 ‖w − w_global‖² to their loss, which keeps a
    /// site whose data differ from the others' near the global model; 0: plain local training.
    #[serde(default)]
    pub proximal_mu: f64,
    /// FedBN (Li et al. 2021): normalisation layers (scale, shift, running statistics) stay at
    /// each site, which trains and keeps its own and sends zeros for them.
    #[serde(default)]
    pub site_normalisation: bool,
    /// The number format of the convolutions: bf16 and f16 halve their memory traffic and run
    /// on a GPU's tensor cores; weights and updates stay f32.
    #[serde(default)]
    pub precision: Precision,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            local_epochs: 2,
            learning_rate: 2e-3,
            batch_size: 4,
            seed: 0,
            proximal_mu: 0.0,
            site_normalisation: false,
            precision: Precision::F32,
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
        // Li et al. tried 0.001 to 1; past 100 the term is all a site would minimise.
        if !(self.proximal_mu.is_finite() && (0.0..=100.0).contains(&self.proximal_mu)) {
            return Err(invalid(
                "proximal_mu",
                format!("{} is not in [0, 100]", self.proximal_mu),
            ));
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
    /// The learning rate over rounds; None: every round at `training.learning_rate`.
    #[serde(default)]
    pub schedule: Option<LearningRateSchedule>,
    /// A server optimizer on each round's aggregate; None: the aggregate is the next model.
    #[serde(default)]
    pub server_optimizer: Option<ServerOptimizer>,
    /// After each round every site measures the new global model on its own validation cases
    /// (only Dice per class and the case count leave it); the run completes once the sites of
    /// its last round have reported on its final model, or its deadline has passed.
    #[serde(default)]
    pub validate_at_sites: bool,
    /// At the end, every site also measures each site's last local model (the last round's
    /// model plus the site's update, which the coordinator saw): how one hospital's model does
    /// on another's patients.
    #[serde(default)]
    pub cross_site_evaluation: bool,
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
            schedule: None,
            server_optimizer: None,
            validate_at_sites: false,
            cross_site_evaluation: false,
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
        if let Some(schedule) = &self.schedule {
            schedule.validate(self.rounds)?;
        }
        // A server optimizer acts on whatever the round's rule, privacy and masking make of the
        // updates (their mean, median or unmasked sum): no combination is refused.
        if let Some(optimizer) = &self.server_optimizer {
            optimizer.validate()?;
        }
        if self.cross_site_evaluation {
            self.check_cross_site()?;
        }
        self.training.validate()
    }

    /// A site's local model is the last round's model plus its update, as the coordinator saw
    /// it: only a run that sees plain, whole updates has one to send round.
    fn check_cross_site(&self) -> Result<(), DomainError> {
        let refuse = |reason: &str| Err(invalid("cross_site_evaluation", reason));
        if !self.validate_at_sites {
            return refuse("it is measured at the sites: turn site validation on");
        }
        if self.secure_aggregation.is_some() {
            return refuse(
                "under secure aggregation the coordinator never sees a site's update, so it has no local model to send round",
            );
        }
        if self.privacy.is_some() {
            return refuse(
                "under differential privacy a site's clipped update is not its local model, and sending that model round would reveal what the privacy budget does not cover",
            );
        }
        if self.training.site_normalisation {
            return refuse(
                "under FedBN a site's normalisation layers stay with it, so the coordinator has no whole local model",
            );
        }
        Ok(())
    }

    /// The learning rate sites train at in `round` (1-based): the schedule's, or the constant.
    pub fn learning_rate(&self, round: u32) -> f64 {
        let peak = self.training.learning_rate;
        self.schedule
            .map_or(peak, |s| s.rate(peak, round, self.rounds))
    }
}

impl From<TrainingConfig> for pb::TrainingConfig {
    fn from(c: TrainingConfig) -> Self {
        Self {
            local_epochs: c.local_epochs,
            learning_rate: c.learning_rate,
            batch_size: c.batch_size,
            seed: c.seed,
            proximal_mu: c.proximal_mu,
            site_normalisation: c.site_normalisation,
            precision: pb::Precision::from(c.precision).into(),
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
            proximal_mu: c.proximal_mu,
            site_normalisation: c.site_normalisation,
            precision: Precision::try_from(c.precision)?,
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
            schedule: c.schedule.map(Into::into),
            server_optimizer: c.server_optimizer.map(Into::into),
            validate_at_sites: c.validate_at_sites,
            cross_site_evaluation: c.cross_site_evaluation,
        }
    }
}

/// Secure aggregation needs at least two sites to hide one, and GF(256) shares allow 255.
pub(super) fn check_threshold(threshold: u32) -> Result<(), DomainError> {
    if (2..=MAX_SECURE_SITES).contains(&threshold) {
        Ok(())
    } else {
        Err(invalid(
            "secure_aggregation.threshold",
            format!("{threshold} is not between 2 and {MAX_SECURE_SITES}"),
        ))
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
            schedule: c.schedule.map(Into::into),
            server_optimizer: c.server_optimizer.map(TryInto::try_into).transpose()?,
            validate_at_sites: c.validate_at_sites,
            cross_site_evaluation: c.cross_site_evaluation,
        };
        c.validate()?;
        Ok(c)
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
        let scheduled = RunConfig {
            schedule: Some(LearningRateSchedule {
                warmup_rounds: 2,
                cosine: true,
                final_fraction: 0.1,
            }),
            ..RunConfig::default()
        };
        let back = RunConfig::try_from(pb::RunConfig::from(scheduled.clone())).unwrap();
        assert_eq!(back, scheduled);
        assert_eq!(back.learning_rate(1), 1e-3);
        let mut bad = pb::RunConfig::from(scheduled);
        bad.schedule.as_mut().unwrap().warmup_rounds = 9;
        assert!(matches!(
            RunConfig::try_from(bad),
            Err(DomainError::Invalid {
                field: "schedule.warmup_rounds",
                ..
            })
        ));
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
    fn cross_site_evaluation_needs_the_sites_updates_whole_and_in_the_clear() {
        let crossed = RunConfig {
            validate_at_sites: true,
            cross_site_evaluation: true,
            ..RunConfig::default()
        };
        crossed.validate().unwrap();
        let refused = |config: RunConfig, expected: &str| {
            let error = config.validate().unwrap_err().to_string();
            assert!(
                error.contains("cross_site_evaluation") && error.contains(expected),
                "{error}"
            );
        };
        refused(
            RunConfig {
                validate_at_sites: false,
                ..crossed.clone()
            },
            "site validation",
        );
        refused(
            RunConfig {
                secure_aggregation: Some(SecureAggregationConfig { threshold: 2 }),
                ..crossed.clone()
            },
            "secure aggregation",
        );
        refused(
            RunConfig {
                privacy: Some(PrivacyConfig {
                    clip_norm: 1.0,
                    noise_multiplier: 1.0,
                    delta: 1e-5,
                    epsilon_budget: None,
                }),
                ..crossed.clone()
            },
            "differential privacy",
        );
        let mut fedbn = crossed;
        fedbn.training.site_normalisation = true;
        refused(fedbn, "FedBN");
    }
}
