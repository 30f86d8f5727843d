//! A model measured on labelled data: Dice on every labelled slice at its original resolution,
//! and, where the data are volumes, HD95 in mm per class over each whole volume.

use std::path::Path;

use alveolus_models::hausdorff::{Grid, hausdorff95};
use alveolus_models::infer::predict;
use alveolus_models::metrics::{DiceReport, SegmentationCounts};
use alveolus_models::network::load_model;
use alveolus_models::train::TrainError;
use alveolus_models::{Device, Inference, Weights};

use crate::dataset::{DatasetError, DatasetSpec, read_mapped_case};
use crate::segment::{SegmentOptions, predict_labels};
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

/// Adds HD95 in mm per class (and for infection) to `report`: each volume case of the dataset
/// at `path` (DICOM series or NIfTI with labels, more than one plane) is predicted plane by
/// plane and compared whole with its labels; each class's figure is the mean over the volumes
/// where both sides have it. Cases that are not volumes are left out; with none, `report` stays
/// as it is. Returns how many volumes were measured.
pub fn add_hausdorff(
    report: &mut DiceReport,
    weights: &Weights,
    path: &Path,
    device: &Device,
) -> Result<usize, EvaluateError> {
    let spec = DatasetSpec::open(path)?;
    if spec.kind == crate::dataset::SourceKind::PngFolder {
        return Ok(0);
    }
    let (model_spec, model) = load_model(weights, device)?;
    let classes = model_spec.classes;
    let inference = Inference::new(&model, model_spec.clone(), device);
    let options = SegmentOptions {
        window: spec.window,
        ..SegmentOptions::default()
    };
    let mut sums = vec![(0.0, 0usize); classes + 1];
    let mut volumes = 0;
    for case in &spec.cases {
        let Some((data, labels)) = read_mapped_case(&spec, case)? else {
            continue;
        };
        let size = data.image.geometry.size;
        if size[2] < 2 {
            continue;
        }
        volumes += 1;
        let predicted = predict_labels(
            &inference,
            &data.image,
            data.intensity,
            &options,
            &mut |_, _| {},
        );
        let truth: Vec<u8> = labels
            .voxels
            .iter()
            .map(|&l| model_spec.class_of_label(l))
            .collect();
        let [sx, sy, sz] = data.image.geometry.spacing;
        let grid = Grid {
            dims: [size[2], size[1], size[0]],
            spacing: [sz, sy, sx],
        };
        for (class, sum) in sums.iter_mut().enumerate().take(classes).skip(1) {
            if let Some(d) = hausdorff95(&predicted.voxels, &truth, grid, |l| l as usize == class) {
                sum.0 += d;
                sum.1 += 1;
            }
        }
        // Infection: the lesion classes together (class 1 of a two-class model).
        if let Some(d) = hausdorff95(&predicted.voxels, &truth, grid, |l| l == 1 || l == 2) {
            sums[classes].0 += d;
            sums[classes].1 += 1;
        }
    }
    let mean = |(sum, n): (f64, usize)| (n > 0).then(|| sum / n as f64);
    for (k, score) in report.per_class.iter_mut().enumerate() {
        score.hd95_mm = mean(sums[k + 1]);
    }
    if volumes > 0 {
        report.infection_hd95_mm = mean(sums[classes]);
    }
    Ok(volumes)
}

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Model(#[from] TrainError),
}
