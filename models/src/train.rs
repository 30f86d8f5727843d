//! Local training and inference on 2D slices.

use alveolus_proto::domain::TrainingConfig;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::Weights;
use crate::augment::AugmentConfig;
use crate::loss::segmentation_loss;
use crate::metrics::SegmentationCounts;
use crate::network::load_model;
use crate::precision::{MAX_OVERFLOWS_IN_A_ROW, MixedPrecision, Unscaled};
use crate::proximal::Proximal;
use crate::schedule::Schedule;
use crate::spec::{DATASET_LABELS, ModelSpec, SpecError};
use crate::trainable::Trainable;
use crate::unet::Segmenter;
use crate::weights::{LoadError, to_weights};

/// One slice at the model's resolution: intensities in [0, 1] and a label per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSlice {
    /// `image_size * image_size` values, row-major.
    pub image: Vec<f32>,
    /// Class per pixel, same layout as `image`.
    pub mask: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TrainError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("no training slices")]
    NoData,
    #[error("slice {index} has {found} pixels; the model expects {expected} ({size}x{size})")]
    SliceSize {
        index: usize,
        found: usize,
        expected: usize,
        size: usize,
    },
    #[error(
        "slice {index} has label {label}; labels are 0 background, 1 GGO, 2 consolidation, 3 lung"
    )]
    Label { index: usize, label: u8 },
    #[error("the model is a {found} network; this needs a {needed} network")]
    Kind { found: String, needed: &'static str },
    #[error("training diverged: the loss became {0}")]
    Diverged(f64),
    #[error(
        "f16 training: the gradients overflowed in {steps} steps in a row, down to a loss scale of {scale}; train at bf16 or f32"
    )]
    Overflow { steps: u32, scale: f64 },
}

/// What local training produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub weights: Weights,
    /// Mean loss over the last epoch.
    pub loss: f64,
    /// Infection Dice of the last epoch's predictions on the training slices.
    pub dice: f64,
    pub samples: usize,
}

/// How to train, beyond the run's [`TrainingConfig`] (which travels with the task).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    pub schedule: Schedule,
    pub augment: AugmentConfig,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// What is trained (fine-tuning may train only part of the network).
    pub trainable: Trainable,
}

impl TrainOptions {
    /// Local training in a federated round: constant rate, full augmentation.
    pub fn federated() -> Self {
        Self {
            schedule: Schedule::Constant,
            augment: AugmentConfig::default(),
            weight_decay: 1e-4,
            trainable: Trainable::All,
        }
    }

    /// A long central run: warm-up and cosine decay, full augmentation.
    pub fn central() -> Self {
        Self {
            schedule: Schedule::COSINE,
            ..Self::federated()
        }
    }
}

/// Where training is, reported to the caller's progress function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// After each optimiser step; `step` counts from 1 within the epoch.
    Step {
        epoch: u32,
        step: usize,
        steps: usize,
        loss: f64,
    },
    /// After each epoch, with its mean loss.
    Epoch { epoch: u32, loss: f64 },
}

fn check_slices(spec: &ModelSpec, slices: &[LabelledSlice]) -> Result<(), TrainError> {
    let expected = spec.image_size * spec.image_size;
    for (index, s) in slices.iter().enumerate() {
        for found in [s.image.len(), s.mask.len()] {
            if found != expected {
                return Err(TrainError::SliceSize {
                    index,
                    found,
                    expected,
                    size: spec.image_size,
                });
            }
        }
        if let Some(&label) = s.mask.iter().find(|&&l| l as usize >= DATASET_LABELS.len()) {
            return Err(TrainError::Label { index, label });
        }
    }
    Ok(())
}

/// The optimiser every training run uses: AdamW with decoupled weight decay.
pub fn optimizer(weight_decay: f32) -> ModuleOptimizer {
    AdamWConfig::new().with_weight_decay(weight_decay).init()
}

/// One optimiser step on a batch: forward, loss, backward, update. Returns the updated model,
/// the loss and the predicted class per pixel (still on the device: reading it is the caller's
/// choice). With `proximal`, FedProx's term joins the gradients (not the reported loss). At
/// f16, a step whose gradients overflowed leaves the model as it was (see [`crate::precision`]).
pub fn step<const D: usize, N: Segmenter<D>>(
    model: N,
    optimizer: &mut ModuleOptimizer,
    x: Tensor<D>,
    one_hot: Tensor<D>,
    rate: f64,
    proximal: Option<&Proximal>,
    mixed: &mut MixedPrecision,
) -> Result<(N, f64, Tensor<D, Int>), TrainError> {
    let logits = model.forward_at(x, mixed.precision());
    let predicted = logits.clone().detach().argmax(1);
    let loss = segmentation_loss(logits, one_hot);
    let value = loss.clone().into_scalar::<f32>() as f64;
    if !value.is_finite() {
        return Err(TrainError::Diverged(value));
    }
    let loss = match mixed.scaler() {
        Some(scaler) => loss.mul_scalar(scaler.scale()),
        None => loss,
    };
    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    if let Some(scaler) = mixed.scaler_mut()
        && scaler.unscale(&model, &mut grads) == Unscaled::Overflow
    {
        if scaler.overflows_in_a_row() >= MAX_OVERFLOWS_IN_A_ROW {
            return Err(TrainError::Overflow {
                steps: scaler.overflows_in_a_row(),
                scale: scaler.scale(),
            });
        }
        return Ok((model, value, predicted));
    }
    if let Some(proximal) = proximal {
        proximal.add_to(&model, &mut grads);
    }
    Ok((optimizer.step(rate, model, grads), value, predicted))
}

/// Builds an input batch and its one-hot target, each slice changed by `augment`.
fn batch(
    spec: &ModelSpec,
    slices: &[&LabelledSlice],
    augment: &AugmentConfig,
    rng: &mut StdRng,
    device: &Device,
) -> (Tensor<4>, Tensor<4>, Vec<u8>) {
    let n = spec.image_size;
    let mut images = Vec::with_capacity(slices.len() * n * n);
    let mut masks = Vec::with_capacity(slices.len() * n * n);
    for s in slices {
        let (image, mask) = augment.apply(&s.image, &s.mask, n, rng);
        images.extend(image);
        masks.extend(mask.into_iter().map(|l| spec.class_of_label(l)));
    }
    let b = slices.len();
    let mut one_hot = vec![0f32; b * spec.classes * n * n];
    for (i, &label) in masks.iter().enumerate() {
        let (sample, pixel) = (i / (n * n), i % (n * n));
        one_hot[(sample * spec.classes + label as usize) * n * n + pixel] = 1.0;
    }
    let x = Tensor::from_data(TensorData::new(images, [b, 1, n, n]), device);
    let y = Tensor::from_data(TensorData::new(one_hot, [b, spec.classes, n, n]), device);
    (x, y, masks)
}

/// Class per pixel from logits `[batch, classes, H, W]`.
pub(crate) fn argmax_labels(logits: Tensor<4>) -> Vec<u8> {
    labels(logits.argmax(1))
}

/// Class indices on the device to host labels.
fn labels(classes: Tensor<4, Int>) -> Vec<u8> {
    classes.into_data().iter::<i64>().map(|c| c as u8).collect()
}

/// Trains from `start` on `slices` for `config.local_epochs` epochs with AdamW.
/// `progress` hears of every step and every epoch.
pub fn train(
    start: &Weights,
    slices: &[LabelledSlice],
    config: &TrainingConfig,
    options: &TrainOptions,
    device: &Device,
    mut progress: impl FnMut(Progress),
) -> Result<TrainOutcome, TrainError> {
    if slices.is_empty() {
        return Err(TrainError::NoData);
    }
    let autodiff = device.clone().autodiff();
    let (spec, model) = load_model(start, &autodiff)?;
    check_slices(&spec, slices)?;
    let mut model = options.trainable.apply(model);
    let proximal = (config.proximal_mu > 0.0).then(|| Proximal::new(&model, config.proximal_mu));
    let mut optimizer = optimizer(options.weight_decay);
    let mut mixed = MixedPrecision::new(config.precision);
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..slices.len()).collect();
    let batch_size = config.batch_size as usize;
    let steps_per_epoch = slices.len().div_ceil(batch_size);
    let total_steps = steps_per_epoch * config.local_epochs as usize;
    let mut step_index = 0;
    let (mut loss_mean, mut counts) = (0.0, SegmentationCounts::new(spec.classes));
    for epoch in 1..=config.local_epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        counts = SegmentationCounts::new(spec.classes);
        for (step, chunk) in order.chunks(batch_size).enumerate() {
            let items: Vec<&LabelledSlice> = chunk.iter().map(|&i| &slices[i]).collect();
            let (x, y, masks) = batch(&spec, &items, &options.augment, &mut rng, &autodiff);
            let rate = options
                .schedule
                .rate(config.learning_rate, step_index, total_steps);
            let (updated, value, predicted) = self::step(
                model,
                &mut optimizer,
                x,
                y,
                rate,
                proximal.as_ref(),
                &mut mixed,
            )?;
            model = updated;
            counts.add(&labels(predicted), &masks);
            loss_sum += value * items.len() as f64;
            seen += items.len();
            step_index += 1;
            progress(Progress::Step {
                epoch,
                step: step + 1,
                steps: steps_per_epoch,
                loss: value,
            });
        }
        loss_mean = loss_sum / seen as f64;
        progress(Progress::Epoch {
            epoch,
            loss: loss_mean,
        });
    }
    let mut weights = to_weights(&model.valid());
    weights.metadata = start.metadata.clone();
    Ok(TrainOutcome {
        weights,
        loss: loss_mean,
        dice: counts.infection_dice().unwrap_or(1.0),
        samples: slices.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{initial_weights, load_model_3d};

    fn slices(spec: &ModelSpec, n: usize) -> Vec<LabelledSlice> {
        let side = spec.image_size;
        (0..n)
            .map(|k| {
                // A bright disc (label 1) on a dark background, at a different place per slice.
                let (cx, cy) = ((side / 3 + k * 3) as f32, (side / 2) as f32);
                let mut image = vec![0.1; side * side];
                let mut mask = vec![0u8; side * side];
                for y in 0..side {
                    for x in 0..side {
                        if (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)
                            < (side as f32 / 5.0).powi(2)
                        {
                            image[y * side + x] = 0.8;
                            mask[y * side + x] = 1;
                        }
                    }
                }
                LabelledSlice { image, mask }
            })
            .collect()
    }

    #[test]
    fn the_3d_network_round_trips_learns_and_is_not_taken_for_a_slice_network() {
        let spec = ModelSpec::tiny_3d();
        let weights = initial_weights(&spec, 2).unwrap();
        assert_eq!(
            weights.tensors["encoders.0.conv1.weight"].shape,
            vec![4, 1, 3, 3, 3]
        );
        assert_eq!(
            weights.tensors["upsamplers.0.weight"].shape,
            vec![16, 8, 2, 2, 2]
        );
        let device = Device::flex();
        let (_, model) = load_model_3d(&weights, &device).unwrap();
        let mut back = to_weights(&model);
        back.metadata = weights.metadata.clone();
        assert_eq!(back, weights);
        assert!(matches!(
            load_model(&weights, &device),
            Err(TrainError::Kind {
                needed: "unet2d",
                ..
            })
        ));

        let batch = crate::bench::synthetic_batch(2, spec.image_size, 3, spec.classes, 5);
        let autodiff = device.autodiff();
        let (_, mut model) = load_model_3d(&weights, &autodiff).unwrap();
        let mut optimizer = optimizer(1e-4);
        let mut f32s = MixedPrecision::new(crate::Precision::F32);
        let mut losses = Vec::new();
        for _ in 0..15 {
            let x = crate::bench::tensor::<5>(&batch.tensors["x"], &autodiff);
            let y = crate::bench::tensor::<5>(&batch.tensors["y"], &autodiff);
            let (updated, loss, predicted) =
                step(model, &mut optimizer, x, y, 1e-2, None, &mut f32s).unwrap();
            assert_eq!(predicted.dims(), [2, 1, 16, 16, 16]);
            model = updated;
            losses.push(loss);
        }
        assert!(
            losses[14] < losses[0] * 0.8,
            "loss {:.3} -> {:.3}",
            losses[0],
            losses[14]
        );
    }

    /// Trains the tiny network on [`slices`] at `precision` and checks that it learned them.
    fn learns_a_simple_lesion_at(precision: crate::Precision) -> TrainOutcome {
        let spec = ModelSpec::tiny();
        let start = initial_weights(&spec, 3).unwrap();
        let data = slices(&spec, 8);
        let config = TrainingConfig {
            local_epochs: 25,
            learning_rate: 1e-2,
            batch_size: 4,
            seed: 1,
            precision,
            ..TrainingConfig::default()
        };
        let mut losses = Vec::new();
        let options = TrainOptions {
            augment: AugmentConfig::NONE,
            ..TrainOptions::federated()
        };
        let outcome = train(&start, &data, &config, &options, &Device::flex(), |p| {
            if let Progress::Epoch { loss, .. } = p {
                losses.push(loss)
            }
        })
        .unwrap();
        assert_eq!(losses.len(), 25);
        assert!(
            losses[24] < losses[0] * 0.7,
            "{precision}: loss went {:.3} -> {:.3}",
            losses[0],
            losses[24]
        );
        assert!(
            outcome.dice > 0.7,
            "{precision}: training Dice {:.3}",
            outcome.dice
        );
        assert_eq!(outcome.samples, 8);
        assert_eq!(outcome.weights.metadata, start.metadata);
        outcome
    }

    #[test]
    fn training_lowers_the_loss_and_learns_a_simple_lesion() {
        learns_a_simple_lesion_at(crate::Precision::F32);
        let spec = ModelSpec::tiny();
        let start = initial_weights(&spec, 3).unwrap();
        let data = slices(&spec, 8);
        let config = TrainingConfig::default();
        let options = TrainOptions::federated();
        // Wrong input sizes and labels are refused, not trained on.
        let mut bad = data.clone();
        bad[2].mask[0] = 9;
        assert!(matches!(
            train(&start, &bad, &config, &options, &Device::flex(), |_| {}),
            Err(TrainError::Label { index: 2, .. })
        ));
        let mut bad = data;
        bad[1].image.pop();
        assert!(matches!(
            train(&start, &bad, &config, &options, &Device::flex(), |_| {}),
            Err(TrainError::SliceSize { index: 1, .. })
        ));
    }

    #[test]
    fn mixed_precision_training_learns_it_too_and_gives_f32_weights_near_f32_training() {
        let f32s = learns_a_simple_lesion_at(crate::Precision::F32);
        for precision in [crate::Precision::Bf16, crate::Precision::F16] {
            let mixed = learns_a_simple_lesion_at(precision);
            // The master weights moved by the same steps, give or take the rounding of the
            // convolutions: near f32 training's, and not equal to them (the casts happened).
            let name = "encoders.0.conv1.weight";
            let (a, b) = (&f32s.weights.tensors[name], &mixed.weights.tensors[name]);
            let largest = a.values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let furthest = a
                .values
                .iter()
                .zip(&b.values)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(furthest > 0.0, "{precision} trained exactly as f32 did");
            assert!(
                furthest < 0.25 * largest,
                "{precision}: {name} moved {furthest} from f32's (largest weight {largest})"
            );
        }
    }
}
