//! How a round's updates become the next global model.
//!
//! - FedAvg: base + Σ nᵢΔᵢ / Σ nᵢ, folded into one f64 running sum as updates are accepted
//!   (memory: one model, whatever the number of sites).
//! - DP-FedAvg: base + (Σ Δᵢ + N(0, (z·C)²)) / m over m clipped updates, equal weights (a
//!   sample count would let one site weigh more than its clip norm allows); also one sum.
//! - Coordinate-wise median and trimmed mean, against a faulty or hostile site: every update of
//!   the round is kept until it closes (memory: one model per reporting site), which is the
//!   price of looking at all values of a coordinate at once.

use alveolus_proto::domain::{AggregationRule, PrivacyConfig};
use alveolus_proto::weights::Weights;
use rand::Rng;

pub enum Aggregator {
    Mean {
        /// Σ wᵢ · Δᵢ per tensor, in the base model's name order.
        sums: Vec<(String, Vec<f64>)>,
        /// Σ wᵢ.
        total_weight: f64,
        /// Noise standard deviation for DP-FedAvg (z·C), None for FedAvg.
        noise_std: Option<f64>,
    },
    Robust {
        rule: AggregationRule,
        updates: Vec<Weights>,
    },
}

impl Aggregator {
    pub fn new(base: &Weights, rule: AggregationRule, privacy: Option<&PrivacyConfig>) -> Self {
        match rule {
            AggregationRule::FedAvg => Self::Mean {
                sums: base
                    .tensors
                    .iter()
                    .map(|(name, t)| (name.clone(), vec![0.0; t.values.len()]))
                    .collect(),
                total_weight: 0.0,
                noise_std: privacy.map(|p| p.noise_multiplier * p.clip_norm),
            },
            rule => Self::Robust {
                rule,
                updates: Vec::new(),
            },
        }
    }

    /// Takes one update in. The caller has checked its layout against the base model (and,
    /// under DP, its norm).
    pub fn add(&mut self, update: &Weights, samples: u64) {
        match self {
            Self::Mean {
                sums,
                total_weight,
                noise_std,
            } => {
                let weight = if noise_std.is_some() {
                    1.0
                } else {
                    samples as f64
                };
                for ((name, sum), (update_name, tensor)) in sums.iter_mut().zip(&update.tensors) {
                    debug_assert_eq!(name, update_name);
                    for (s, v) in sum.iter_mut().zip(&tensor.values) {
                        *s += weight * *v as f64;
                    }
                }
                *total_weight += weight;
            }
            Self::Robust { updates, .. } => updates.push(update.clone()),
        }
    }

    /// The next global model, with the base's metadata. `rng` draws DP noise (a CSPRNG in
    /// production, seeded in tests).
    pub fn finish(&self, base: &Weights, rng: &mut impl Rng) -> Weights {
        match self {
            Self::Mean {
                sums,
                total_weight,
                noise_std,
            } => {
                let denominator = total_weight.max(1.0);
                let means = sums.iter().flat_map(|(_, sum)| sum).map(|&s| {
                    let noise =
                        noise_std.map_or(0.0, |std| alveolus_privacy::dp::gaussian_noise(std, rng));
                    (s + noise) / denominator
                });
                shifted(base, means)
            }
            Self::Robust { rule, updates } => {
                let mut column = Vec::with_capacity(updates.len());
                let centres = base
                    .tensors
                    .iter()
                    .flat_map(|(name, t)| (0..t.values.len()).map(move |i| (name, i)))
                    .map(|(name, i)| {
                        column.clear();
                        column.extend(updates.iter().map(|u| u.tensors[name].values[i]));
                        robust_centre(*rule, &mut column) as f64
                    });
                shifted(base, centres)
            }
        }
    }
}

/// `base` plus `deltas` (one per value, in tensor-name order), with the base's metadata.
pub fn shifted(base: &Weights, mut deltas: impl Iterator<Item = f64>) -> Weights {
    let mut next = base.clone();
    for tensor in next.tensors.values_mut() {
        for (v, delta) in tensor.values.iter_mut().zip(&mut deltas) {
            *v = (*v as f64 + delta) as f32;
        }
    }
    next
}

/// The median or trimmed mean of one coordinate's values (reordered in place).
fn robust_centre(rule: AggregationRule, values: &mut [f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f32::total_cmp);
    let n = values.len();
    match rule {
        AggregationRule::TrimmedMean { trim_fraction } => {
            let cut = ((trim_fraction * n as f64).floor() as usize).min((n - 1) / 2);
            let kept = &values[cut..n - cut];
            (kept.iter().map(|&v| v as f64).sum::<f64>() / kept.len() as f64) as f32
        }
        _ if n % 2 == 1 => values[n / 2],
        _ => ((values[n / 2 - 1] as f64 + values[n / 2] as f64) / 2.0) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alveolus_proto::weights::Tensor;
    use rand::SeedableRng;

    fn weights(values: &[f32]) -> Weights {
        let mut w = Weights::default();
        w.tensors.insert(
            "w".into(),
            Tensor::new(vec![values.len()], values.to_vec()).unwrap(),
        );
        w
    }

    fn aggregate(
        rule: AggregationRule,
        privacy: Option<&PrivacyConfig>,
        updates: &[(&[f32], u64)],
    ) -> Vec<f32> {
        let base = weights(&[1.0, 2.0]);
        let mut aggregator = Aggregator::new(&base, rule, privacy);
        for (u, n) in updates {
            aggregator.add(&weights(u), *n);
        }
        aggregator
            .finish(&base, &mut rand::rngs::StdRng::seed_from_u64(1))
            .tensors["w"]
            .values
            .clone()
    }

    #[test]
    fn fedavg_adds_the_weighted_mean_of_updates_to_base() {
        // (1*1 + 3*4)/4 = 3.25 ; (0 + 9)/4 = 2.25
        let out = aggregate(
            AggregationRule::FedAvg,
            None,
            &[(&[1.0, 0.0], 1), (&[4.0, 3.0], 3)],
        );
        assert_eq!(out, vec![4.25, 4.25]);
    }

    /// One hostile site sending huge values moves a median or trimmed mean no further than the
    /// honest sites' range, while it drags the mean away.
    #[test]
    fn robust_rules_resist_one_outlier() {
        let honest: [&[f32]; 4] = [&[0.1, -0.1], &[0.2, -0.2], &[0.3, -0.3], &[0.25, -0.15]];
        let mut updates: Vec<(&[f32], u64)> = honest.iter().map(|u| (*u, 1)).collect();
        updates.push((&[1000.0, -1000.0], 1));
        let median = aggregate(AggregationRule::Median, None, &updates);
        assert_eq!(median, vec![1.0 + 0.25, 2.0 - 0.2]);
        let trimmed = aggregate(
            AggregationRule::TrimmedMean { trim_fraction: 0.2 },
            None,
            &updates,
        );
        assert!((trimmed[0] - (1.0 + 0.25)).abs() < 1e-6, "{trimmed:?}");
        // -1000 and -0.1 are cut: mean of -0.3, -0.2, -0.15.
        assert!(
            (trimmed[1] - (2.0 - 0.65 / 3.0)).abs() < 1e-6,
            "{trimmed:?}"
        );
        let mean = aggregate(AggregationRule::FedAvg, None, &updates);
        assert!(mean[0] > 100.0);
        // An even count takes the mean of the middle two.
        let even = aggregate(AggregationRule::Median, None, &updates[..4]);
        assert!((even[0] - (1.0 + 0.225)).abs() < 1e-6, "{even:?}");
    }

    #[test]
    fn dp_fedavg_weighs_sites_equally_and_adds_noise() {
        let privacy = PrivacyConfig {
            clip_norm: 1.0,
            noise_multiplier: 0.0,
            delta: 1e-5,
            epsilon_budget: None,
        };
        // Without noise: the plain mean, whatever the sample counts.
        let out = aggregate(
            AggregationRule::FedAvg,
            Some(&privacy),
            &[(&[1.0, 0.0], 1), (&[3.0, 2.0], 100)],
        );
        assert_eq!(out, vec![3.0, 3.0]);
        let noisy = PrivacyConfig {
            noise_multiplier: 1.0,
            ..privacy
        };
        let out = aggregate(
            AggregationRule::FedAvg,
            Some(&noisy),
            &[(&[1.0, 0.0], 1), (&[3.0, 2.0], 100)],
        );
        assert_ne!(out, vec![3.0, 3.0]);
    }
}
