//! FedAvg: the new global model is the old one plus the sample-weighted mean of the updates.
//!
//! Updates are folded into one f64 running sum as they are accepted, so memory is one model
//! whatever the number of sites.

use alveolus_proto::weights::{Tensor, Weights};

pub struct FedAvg {
    /// Σ n_i · Δ_i per tensor, in the base model's name order.
    sums: Vec<(String, Vec<f64>)>,
    /// Σ n_i.
    total_samples: u64,
}

impl FedAvg {
    pub fn new(base: &Weights) -> Self {
        Self {
            sums: base
                .tensors
                .iter()
                .map(|(name, t)| (name.clone(), vec![0.0; t.values.len()]))
                .collect(),
            total_samples: 0,
        }
    }

    /// Folds one update in. The caller has checked its layout against the base model.
    pub fn add(&mut self, update: &Weights, samples: u64) {
        let weight = samples as f64;
        for ((name, sum), (update_name, tensor)) in self.sums.iter_mut().zip(&update.tensors) {
            debug_assert_eq!(name, update_name);
            for (s, v) in sum.iter_mut().zip(&tensor.values) {
                *s += weight * *v as f64;
            }
        }
        self.total_samples += samples;
    }

    pub fn total_samples(&self) -> u64 {
        self.total_samples
    }

    /// `base + Σ n_i Δ_i / Σ n_i`, with the base's metadata.
    pub fn finish(&self, base: &Weights) -> Weights {
        let denominator = self.total_samples.max(1) as f64;
        let tensors = base
            .tensors
            .iter()
            .zip(&self.sums)
            .map(|((name, t), (_, sum))| {
                let values = t
                    .values
                    .iter()
                    .zip(sum)
                    .map(|(b, s)| (*b as f64 + s / denominator) as f32)
                    .collect();
                (
                    name.clone(),
                    Tensor {
                        shape: t.shape.clone(),
                        values,
                    },
                )
            })
            .collect();
        Weights {
            tensors,
            metadata: base.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(values: &[f32]) -> Weights {
        let mut w = Weights::default();
        w.tensors.insert(
            "w".into(),
            Tensor::new(vec![values.len()], values.to_vec()).unwrap(),
        );
        w
    }

    #[test]
    fn weighted_mean_of_updates_is_added_to_base() {
        let base = weights(&[1.0, 2.0]);
        let mut avg = FedAvg::new(&base);
        avg.add(&weights(&[1.0, 0.0]), 1);
        avg.add(&weights(&[4.0, 3.0]), 3);
        let out = avg.finish(&base);
        // (1*1 + 3*4)/4 = 3.25 ; (0 + 9)/4 = 2.25
        assert_eq!(out.tensors["w"].values, vec![4.25, 4.25]);
        assert_eq!(avg.total_samples(), 4);
    }
}
