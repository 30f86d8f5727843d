//! Server optimizers: what the coordinator does with a round's aggregate. Plain FedAvg takes it
//! as the next model; FedAvgM, FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021, "Adaptive
//! Federated Optimization") treat the aggregate minus the round's model as a pseudo-gradient
//! and step along it with momentum or per-coordinate adaptive rates, which is what helps when
//! sites' data differ.

use serde::{Deserialize, Serialize};

use super::{DomainError, invalid};
use crate::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerOptimizerKind {
    /// Server momentum (Hsu et al. 2019): m ← β1·m + Δ, x ← x + η·m.
    FedAvgM,
    /// m ← β1·m + (1−β1)·Δ, v ← v + Δ², x ← x + η·m / (√v + τ).
    FedAdagrad,
    /// As FedAdagrad with v ← β2·v + (1−β2)·Δ².
    FedAdam,
    /// As FedAdagrad with v ← v − (1−β2)·Δ²·sign(v − Δ²).
    FedYogi,
}

impl ServerOptimizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FedAvgM => "fedavgm",
            Self::FedAdagrad => "fedadagrad",
            Self::FedAdam => "fedadam",
            Self::FedYogi => "fedyogi",
        }
    }

    /// Whether it keeps a second moment and divides by it (all but FedAvgM).
    pub fn adaptive(self) -> bool {
        self != Self::FedAvgM
    }
}

/// A server optimizer and its hyper-parameters; its state (m, v) lives with the coordinator's
/// checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerOptimizer {
    pub kind: ServerOptimizerKind,
    /// η, the server's learning rate.
    pub learning_rate: f64,
    /// β1, the first moment's decay (FedAvgM: the momentum).
    pub beta1: f64,
    /// β2, the second moment's decay (FedAdam, FedYogi).
    pub beta2: f64,
    /// τ, the adaptivity: added to √v, and v starts at τ² (the paper's v₋₁ ≥ τ²).
    pub tau: f64,
}

impl ServerOptimizer {
    /// The paper's and Flower's usual settings: η 1 for FedAvgM, 0.01 for the adaptive ones,
    /// β1 0.9, β2 0.99, τ 1e-3.
    pub fn with_defaults(kind: ServerOptimizerKind) -> Self {
        Self {
            kind,
            learning_rate: if kind.adaptive() { 1e-2 } else { 1.0 },
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }

    pub fn validate(&self) -> Result<(), DomainError> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(
                "server_optimizer.learning_rate",
                format!("{} is not finite and positive", self.learning_rate),
            ));
        }
        for (field, beta) in [
            ("server_optimizer.beta1", self.beta1),
            ("server_optimizer.beta2", self.beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return Err(invalid(field, format!("{beta} is not in [0, 1)")));
            }
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(invalid(
                "server_optimizer.tau",
                format!("{} is not finite and positive", self.tau),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for ServerOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (server lr {}, beta1 {}",
            self.kind.as_str(),
            self.learning_rate,
            self.beta1
        )?;
        if self.kind.adaptive() {
            if self.kind != ServerOptimizerKind::FedAdagrad {
                write!(f, ", beta2 {}", self.beta2)?;
            }
            write!(f, ", tau {}", self.tau)?;
        }
        write!(f, ")")
    }
}

impl From<ServerOptimizer> for pb::ServerOptimizer {
    fn from(o: ServerOptimizer) -> Self {
        Self {
            kind: match o.kind {
                ServerOptimizerKind::FedAvgM => pb::ServerOptimizerKind::Fedavgm,
                ServerOptimizerKind::FedAdagrad => pb::ServerOptimizerKind::Fedadagrad,
                ServerOptimizerKind::FedAdam => pb::ServerOptimizerKind::Fedadam,
                ServerOptimizerKind::FedYogi => pb::ServerOptimizerKind::Fedyogi,
            } as i32,
            learning_rate: o.learning_rate,
            beta1: o.beta1,
            beta2: o.beta2,
            tau: o.tau,
        }
    }
}

impl TryFrom<pb::ServerOptimizer> for ServerOptimizer {
    type Error = DomainError;
    fn try_from(o: pb::ServerOptimizer) -> Result<Self, DomainError> {
        let kind = match pb::ServerOptimizerKind::try_from(o.kind) {
            Ok(pb::ServerOptimizerKind::Fedavgm) => ServerOptimizerKind::FedAvgM,
            Ok(pb::ServerOptimizerKind::Fedadagrad) => ServerOptimizerKind::FedAdagrad,
            Ok(pb::ServerOptimizerKind::Fedadam) => ServerOptimizerKind::FedAdam,
            Ok(pb::ServerOptimizerKind::Fedyogi) => ServerOptimizerKind::FedYogi,
            Err(_) => {
                return Err(invalid(
                    "server_optimizer.kind",
                    format!("unknown server optimizer {}", o.kind),
                ));
            }
        };
        let o = Self {
            kind,
            learning_rate: o.learning_rate,
            beta1: o.beta1,
            beta2: o.beta2,
            tau: o.tau,
        };
        o.validate()?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_hyper_parameters_are_refused_with_the_field() {
        let good = ServerOptimizer::with_defaults(ServerOptimizerKind::FedAdam);
        assert!(good.validate().is_ok());
        for (bad, field) in [
            (
                ServerOptimizer {
                    learning_rate: 0.0,
                    ..good
                },
                "learning_rate",
            ),
            (
                ServerOptimizer {
                    learning_rate: f64::INFINITY,
                    ..good
                },
                "learning_rate",
            ),
            (ServerOptimizer { beta1: 1.0, ..good }, "beta1"),
            (
                ServerOptimizer {
                    beta2: -0.1,
                    ..good
                },
                "beta2",
            ),
            (ServerOptimizer { tau: 0.0, ..good }, "tau"),
            (
                ServerOptimizer {
                    tau: f64::NAN,
                    ..good
                },
                "tau",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
            let pb = pb::ServerOptimizer::from(bad);
            assert!(ServerOptimizer::try_from(pb).is_err());
        }
        let mut unknown = pb::ServerOptimizer::from(good);
        unknown.kind = 42;
        assert!(ServerOptimizer::try_from(unknown).is_err());
        for kind in [
            ServerOptimizerKind::FedAvgM,
            ServerOptimizerKind::FedAdagrad,
            ServerOptimizerKind::FedAdam,
            ServerOptimizerKind::FedYogi,
        ] {
            let o = ServerOptimizer::with_defaults(kind);
            assert_eq!(
                ServerOptimizer::try_from(pb::ServerOptimizer::from(o)),
                Ok(o)
            );
        }
    }
}

/// What a run does beyond FedAvg at a constant rate, as a checkpoint's manifest records it so
/// that whoever receives the model knows how it was made.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    pub schedule: Option<super::LearningRateSchedule>,
    pub server_optimizer: Option<ServerOptimizer>,
    /// FedProx's μ; 0 without.
    pub proximal_mu: f64,
    /// FedBN.
    pub site_normalisation: bool,
}

impl Strategy {
    /// `config`'s strategy; None for plain FedAvg at a constant rate.
    pub fn of(config: &super::RunConfig) -> Option<Self> {
        let strategy = Self {
            schedule: config.schedule,
            server_optimizer: config.server_optimizer,
            proximal_mu: config.training.proximal_mu,
            site_normalisation: config.training.site_normalisation,
        };
        let plain = strategy.schedule.is_none()
            && strategy.server_optimizer.is_none()
            && strategy.proximal_mu == 0.0
            && !strategy.site_normalisation;
        (!plain).then_some(strategy)
    }
}
