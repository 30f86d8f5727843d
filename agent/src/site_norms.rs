//! FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
//! Normalization"): a run may keep every normalisation layer (scale, shift and running
//! statistics) at its site, since scanners and reconstruction kernels differ from hospital to
//! hospital in just what those layers learn. The site trains from the global model with its
//! own normalisation in place, keeps what training made of it for the next round, and sends
//! zeros for those tensors: the sum, mean, median or server step over zeros leaves the global
//! model's normalisation as the run started it, whatever the aggregation, and the update keeps
//! the layout that secure aggregation and DP expect. (DP's noise lands on those zeros too; no
//! site uses the global normalisation, so that costs nothing.)

use std::collections::BTreeMap;

use alveolus_proto::weights::{Tensor, Weights};

/// The model metadata that says which tensors are each site's own, and its value under FedBN.
pub const SITE_SPECIFIC_METADATA_KEY: &str = "alveolus.site_specific";
pub const SITE_SPECIFIC_NORMALISATION: &str = "normalisation layers (FedBN): each site trains and keeps its own; these are the run's initial ones (plus the noise, under DP)";

/// A tensor of a normalisation layer (`….norm1.weight`, `….norm2.running_var`, …).
pub fn is_normalisation(name: &str) -> bool {
    name.split('.').any(|part| part.starts_with("norm"))
}

/// This site's normalisation tensors for one run. Held in memory: an agent that restarts
/// takes the global model's until its next round trains them again.
#[derive(Debug, Default)]
pub struct SiteNorms {
    run_id: String,
    tensors: BTreeMap<String, Tensor>,
}

impl SiteNorms {
    /// `global` with this site's normalisation tensors in place of the global ones, when they
    /// are of this run and of the same shapes; returns how many were put in.
    pub fn personalise(&self, run_id: &str, global: &mut Weights) -> usize {
        if self.run_id != run_id {
            return 0;
        }
        let mut placed = 0;
        for (name, local) in &self.tensors {
            if let Some(tensor) = global.tensors.get_mut(name)
                && tensor.shape == local.shape
            {
                *tensor = local.clone();
                placed += 1;
            }
        }
        placed
    }

    /// Keeps `trained`'s normalisation tensors for the next round of `run_id`.
    pub fn keep(run_id: &str, trained: &Weights) -> Self {
        Self {
            run_id: run_id.to_owned(),
            tensors: trained
                .tensors
                .iter()
                .filter(|(name, _)| is_normalisation(name))
                .map(|(name, t)| (name.clone(), t.clone()))
                .collect(),
        }
    }
}

/// Zeroes an update's normalisation tensors; returns how many values were zeroed.
pub fn withhold_normalisation(update: &mut Weights) -> usize {
    update
        .tensors
        .iter_mut()
        .filter(|(name, _)| is_normalisation(name))
        .map(|(_, t)| {
            t.values.iter_mut().for_each(|v| *v = 0.0);
            t.values.len()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(pairs: &[(&str, f32)]) -> Weights {
        let mut w = Weights::default();
        for (name, value) in pairs {
            w.tensors.insert(
                (*name).to_owned(),
                Tensor {
                    values: vec![*value; 2],
                    shape: vec![2],
                },
            );
        }
        w
    }

    #[test]
    fn a_site_keeps_its_normalisation_and_sends_none_of_it() {
        let names = [
            "encoders.0.conv1.weight",
            "encoders.0.norm1.weight",
            "encoders.0.norm1.running_var",
            "head.bias",
        ];
        assert_eq!(
            names.map(is_normalisation),
            [false, true, true, false],
            "only norm layers"
        );
        let trained = weights(&[
            (names[0], 1.0),
            (names[1], 2.0),
            (names[2], 3.0),
            (names[3], 4.0),
        ]);
        let kept = SiteNorms::keep("run-1", &trained);

        // The next round's global model gets the site's norms, not the global ones.
        let mut global = weights(&[
            (names[0], 9.0),
            (names[1], 9.0),
            (names[2], 9.0),
            (names[3], 9.0),
        ]);
        assert_eq!(kept.personalise("run-1", &mut global), 2);
        assert_eq!(global.tensors[names[0]].values, vec![9.0; 2]);
        assert_eq!(global.tensors[names[1]].values, vec![2.0; 2]);
        assert_eq!(global.tensors[names[2]].values, vec![3.0; 2]);
        // Another run starts from the global model's.
        let mut other = weights(&[(names[1], 9.0)]);
        assert_eq!(kept.personalise("run-2", &mut other), 0);
        assert_eq!(other.tensors[names[1]].values, vec![9.0; 2]);

        let mut update = weights(&[
            (names[0], 0.5),
            (names[1], 0.5),
            (names[2], 0.5),
            (names[3], 0.5),
        ]);
        assert_eq!(withhold_normalisation(&mut update), 4);
        assert_eq!(update.tensors[names[0]].values, vec![0.5; 2]);
        assert_eq!(update.tensors[names[1]].values, vec![0.0; 2]);
        assert_eq!(update.tensors[names[3]].values, vec![0.5; 2]);
    }
}
