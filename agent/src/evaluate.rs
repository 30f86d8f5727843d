//! Dice of a model on a labelled slice dataset, at each slice's original resolution.

use alveolus_models::metrics::{DiceReport, SegmentationCounts};
use alveolus_models::train::{TrainError, load_model, predict};
use alveolus_models::{Device, Weights};

use crate::slices::{SliceDataset, resize_nearest};

/// Predicts every slice at the model's size, brings the labels back to the slice's own size
/// and compares them with its mask.
pub fn evaluate(
    weights: &Weights,
    data: &SliceDataset,
    device: &Device,
) -> Result<DiceReport, TrainError> {
    let (spec, model) = load_model(weights, device)?;
    let resized = data.at_size(spec.image_size);
    let images: Vec<&[f32]> = resized.iter().map(|s| s.image.as_slice()).collect();
    let predictions = predict(&model, &spec, &images, device);
    let mut counts = SegmentationCounts::new(spec.classes);
    for (slice, predicted) in data.slices.iter().zip(&predictions) {
        let full = resize_nearest(
            predicted,
            spec.image_size,
            spec.image_size,
            slice.width,
            slice.height,
        );
        let truth: Vec<u8> = slice.mask.iter().map(|&l| spec.class_of_label(l)).collect();
        counts.add(&full, &truth);
    }
    Ok(counts.report(spec.class_names()))
}
