//! Local training and inference on 2D slices.

use alveolus_proto::domain::TrainingConfig;
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::Weights;
use crate::loss::segmentation_loss;
use crate::metrics::SegmentationCounts;
use crate::spec::{ModelSpec, SpecError};
use crate::unet::UNet2d;
use crate::weights::{LoadError, load_weights, to_weights};

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
    #[error("slice {index} has label {label}; the model knows classes 0..{classes}")]
    Label {
        index: usize,
        label: u8,
        classes: usize,
    },
    #[error("training diverged: the loss became {0}")]
    Diverged(f64),
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

/// Fresh weights for `spec`, reproducible from `seed`, with the spec in their metadata.
pub fn initial_weights(spec: &ModelSpec, seed: u64) -> Result<Weights, SpecError> {
    spec.validate()?;
    let device = Device::flex();
    device.seed(seed);
    let mut weights = to_weights(&UNet2d::new(spec, &device));
    let (key, value) = spec.to_metadata();
    weights.metadata.insert(key, value);
    Ok(weights)
}

/// The network described by `weights`' metadata, loaded with them.
pub fn load_model(weights: &Weights, device: &Device) -> Result<(ModelSpec, UNet2d), TrainError> {
    let spec = ModelSpec::from_weights(weights)?;
    let model = load_weights(UNet2d::new(&spec, device), weights)?;
    Ok((spec, model))
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
        if let Some(&label) = s.mask.iter().find(|&&l| l as usize >= spec.classes) {
            return Err(TrainError::Label {
                index,
                label,
                classes: spec.classes,
            });
        }
    }
    Ok(())
}

/// Builds an input batch and its one-hot target, flipping slices left-right at random.
fn batch(
    spec: &ModelSpec,
    slices: &[&LabelledSlice],
    rng: &mut StdRng,
    device: &Device,
) -> (Tensor<4>, Tensor<4>, Vec<u8>) {
    let n = spec.image_size;
    let mut images = Vec::with_capacity(slices.len() * n * n);
    let mut masks = Vec::with_capacity(slices.len() * n * n);
    for s in slices {
        let flip = rng.random_bool(0.5);
        for row in 0..n {
            let line = row * n..(row + 1) * n;
            if flip {
                images.extend(s.image[line.clone()].iter().rev());
                masks.extend(s.mask[line].iter().rev());
            } else {
                images.extend_from_slice(&s.image[line.clone()]);
                masks.extend_from_slice(&s.mask[line]);
            }
        }
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
fn argmax_labels(logits: Tensor<4>) -> Vec<u8> {
    logits
        .argmax(1)
        .into_data()
        .iter::<i64>()
        .map(|c| c as u8)
        .collect()
}

/// Trains from `start` on `slices` for `config.local_epochs` epochs with Adam.
/// `progress(epoch, mean_loss)` is called after each epoch.
pub fn train(
    start: &Weights,
    slices: &[LabelledSlice],
    config: &TrainingConfig,
    device: &Device,
    mut progress: impl FnMut(u32, f64),
) -> Result<TrainOutcome, TrainError> {
    if slices.is_empty() {
        return Err(TrainError::NoData);
    }
    let autodiff = device.clone().autodiff();
    let (spec, mut model) = load_model(start, &autodiff)?;
    check_slices(&spec, slices)?;
    let mut optimizer = AdamConfig::new().init();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..slices.len()).collect();
    let (mut loss_mean, mut counts) = (0.0, SegmentationCounts::new(spec.classes));
    for epoch in 1..=config.local_epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        counts = SegmentationCounts::new(spec.classes);
        for chunk in order.chunks(config.batch_size as usize) {
            let items: Vec<&LabelledSlice> = chunk.iter().map(|&i| &slices[i]).collect();
            let (x, y, masks) = batch(&spec, &items, &mut rng, &autodiff);
            let logits = model.forward(x);
            counts.add(&argmax_labels(logits.clone().detach()), &masks);
            let loss = segmentation_loss(logits, y);
            let value = loss.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                return Err(TrainError::Diverged(value));
            }
            loss_sum += value * items.len() as f64;
            seen += items.len();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(config.learning_rate, model, grads);
        }
        loss_mean = loss_sum / seen as f64;
        progress(epoch, loss_mean);
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

/// Predicted class per pixel for each image (`image_size^2` values in [0, 1]).
pub fn predict(
    model: &UNet2d,
    spec: &ModelSpec,
    images: &[&[f32]],
    device: &Device,
) -> Vec<Vec<u8>> {
    let n = spec.image_size;
    let model = model.valid();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(8) {
        let data: Vec<f32> = chunk.iter().flat_map(|i| i.iter().copied()).collect();
        let x = Tensor::from_data(TensorData::new(data, [chunk.len(), 1, n, n]), device);
        let labels = argmax_labels(model.forward(x));
        out.extend(labels.chunks(n * n).map(<[u8]>::to_vec));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::LoadError;

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
    fn weights_round_trip_through_the_module_exactly() {
        let spec = ModelSpec::tiny();
        let weights = initial_weights(&spec, 11).unwrap();
        assert_eq!(
            initial_weights(&spec, 11).unwrap(),
            weights,
            "same seed, same weights"
        );
        assert_ne!(
            initial_weights(&spec, 12).unwrap(),
            weights,
            "another seed, other weights"
        );
        let device = Device::flex();
        let (_, model) = load_model(&weights, &device).unwrap();
        let mut back = to_weights(&model);
        back.metadata = weights.metadata.clone();
        assert_eq!(back, weights);
        assert!(weights.tensors.contains_key("encoders.0.conv1.weight"));
        assert!(weights.tensors.contains_key("decoders.1.norm2.running_var"));
        assert!(weights.tensors.contains_key("head.bias"));
    }

    #[test]
    fn loading_refuses_missing_reshaped_and_foreign_tensors() {
        let spec = ModelSpec::tiny();
        let device = Device::flex();
        let weights = initial_weights(&spec, 1).unwrap();
        let mut missing = weights.clone();
        missing.tensors.remove("head.weight");
        assert!(
            matches!(load_model(&missing, &device), Err(TrainError::Load(LoadError::Missing(n))) if n == "head.weight")
        );
        let mut reshaped = weights.clone();
        reshaped.tensors.get_mut("head.bias").unwrap().shape = vec![1, 3];
        assert!(matches!(
            load_model(&reshaped, &device),
            Err(TrainError::Load(LoadError::Shape { .. }))
        ));
        let mut extra = weights.clone();
        extra.tensors.insert(
            "decoy".into(),
            crate::NamedTensor {
                shape: vec![1],
                values: vec![0.0],
            },
        );
        assert!(
            matches!(load_model(&extra, &device), Err(TrainError::Load(LoadError::Unexpected(n))) if n == "decoy")
        );
        let mut anonymous = weights;
        anonymous.metadata.clear();
        assert!(matches!(
            load_model(&anonymous, &device),
            Err(TrainError::Spec(SpecError::Missing))
        ));
    }

    #[test]
    fn training_lowers_the_loss_and_learns_a_simple_lesion() {
        let spec = ModelSpec::tiny();
        let start = initial_weights(&spec, 3).unwrap();
        let data = slices(&spec, 8);
        let config = TrainingConfig {
            local_epochs: 25,
            learning_rate: 1e-2,
            batch_size: 4,
            seed: 1,
        };
        let mut losses = Vec::new();
        let outcome = train(&start, &data, &config, &Device::flex(), |_, loss| {
            losses.push(loss)
        })
        .unwrap();
        assert_eq!(losses.len(), 25);
        assert!(
            losses[24] < losses[0] * 0.7,
            "loss went {:.3} -> {:.3}",
            losses[0],
            losses[24]
        );
        assert!(outcome.dice > 0.7, "training Dice {:.3}", outcome.dice);
        assert_eq!(outcome.samples, 8);
        assert_eq!(outcome.weights.metadata, start.metadata);
        // Wrong input sizes and labels are refused, not trained on.
        let mut bad = data.clone();
        bad[2].mask[0] = 9;
        assert!(matches!(
            train(&start, &bad, &config, &Device::flex(), |_, _| {}),
            Err(TrainError::Label { index: 2, .. })
        ));
        let mut bad = data;
        bad[1].image.pop();
        assert!(matches!(
            train(&start, &bad, &config, &Device::flex(), |_, _| {}),
            Err(TrainError::SliceSize { index: 1, .. })
        ));
    }
}
