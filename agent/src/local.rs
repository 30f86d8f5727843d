//! What a site computes in a round, apart from how it talks to the coordinator: the update
//! its training makes of the round's global model (FedBN's withheld layers and DP's clipping
//! applied), and what it measures of a finished round's model on its validation cases. The
//! agent runs these between its gRPC calls; `alveolus simulate` runs the same functions
//! against the coordinator's engine in one process.

use alveolus_imaging::SliceDataset;
use alveolus_models::train::{TrainError, train};
use alveolus_models::{Device, LabelledSlice, Progress, TrainOptions};
use alveolus_proto::domain::{ClassDice, Metrics, TrainTask, Validation};
use alveolus_proto::weights::Weights;

use crate::error::AgentError;
use crate::site_norms::withhold_normalisation;

/// A site's part in a round, ready to be sent.
pub struct LocalUpdate {
    /// The trained local model: FedBN keeps its normalisation layers from it.
    pub local: Weights,
    /// Local minus global, with FedBN's layers zeroed and DP's clip applied.
    pub update: Weights,
    pub samples: usize,
    /// The last epoch's mean loss and training Dice.
    pub metrics: Metrics,
    /// The update's L2 norm before DP clipped it, when it did.
    pub clipped_from: Option<f64>,
}

/// Trains `start` (the round's global model, with the site's own normalisation layers in
/// place under FedBN) on `slices` as `task` says, and makes the update. The seed is the run's
/// plus the round, so that rounds differ and a run repeats.
pub fn local_update(
    start: &Weights,
    slices: &[LabelledSlice],
    task: &TrainTask,
    device: &Device,
    progress: impl FnMut(Progress),
) -> Result<LocalUpdate, AgentError> {
    let mut training = task.training.clone();
    training.seed = training.seed.wrapping_add(task.round as u64);
    let outcome = train(
        start,
        slices,
        &training,
        &TrainOptions::federated(),
        device,
        progress,
    )?;
    let mut update = outcome
        .weights
        .minus(start)
        .map_err(|e| AgentError::Transfer(e.to_string()))?;
    if task.training.site_normalisation {
        withhold_normalisation(&mut update);
    }
    let clipped_from = task
        .clip_norm
        .map(|clip_norm| alveolus_privacy::dp::clip(&mut update, clip_norm));
    Ok(LocalUpdate {
        local: outcome.weights,
        update,
        samples: outcome.samples,
        metrics: Metrics {
            loss: outcome.loss,
            dice: outcome.dice,
        },
        clipped_from,
    })
}

/// Measures `model` on the site's validation slices (`cases` cases): Dice per class and of
/// the lesions merged, which is all that leaves the site of them.
pub fn measure(
    model: &Weights,
    slices: &SliceDataset,
    cases: usize,
    device: &Device,
) -> Result<Validation, TrainError> {
    let report = alveolus_imaging::evaluate::evaluate(model, slices, device)?;
    Ok(Validation {
        cases: u32::try_from(cases).unwrap_or(u32::MAX),
        infection_dice: report.infection,
        classes: report
            .per_class
            .into_iter()
            .map(|c| ClassDice {
                class: c.class,
                dice: c.dice,
            })
            .collect(),
    })
}

/// What a site without validation cases reports: that it has none.
pub fn no_validation() -> Validation {
    Validation {
        cases: 0,
        infection_dice: None,
        classes: Vec::new(),
    }
}
