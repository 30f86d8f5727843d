//! Timing of training steps, for `alveolus bench train`: the step [`train`](crate::train::train)
//! takes, on a fixed batch, on any device.

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::network::{load_model, load_model_3d};
use crate::precision::{MixedPrecision, Precision};
use crate::train::{TrainError, optimizer, step};
use crate::unet::Segmenter;
use crate::{ModelSpec, NamedTensor, ResolvedDevice, Weights};

/// A reproducible batch: smooth random intensities and labels drawn from them, so every class
/// is present. Stored as the tensors `x` (`[batch, 1, side..]`, `dims` spatial dimensions) and
/// `y` (one-hot) for PyTorch.
pub fn synthetic_batch(
    batch: usize,
    side: usize,
    dims: usize,
    classes: usize,
    seed: u64,
) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let voxels = side.pow(dims as u32);
    let mut x = Vec::with_capacity(batch * voxels);
    for _ in 0..batch {
        let f: [f32; 3] = std::array::from_fn(|_| rng.random_range(1.0..4.0f32));
        let phase = rng.random_range(0.0..6.3f32);
        for i in 0..voxels {
            // Fractional coordinates, fastest axis first.
            let at = |axis: u32| ((i / side.pow(axis)) % side) as f32 / side as f32;
            let mut wave = (f[0] * 6.3 * at(0) + phase).sin() * (f[1] * 6.3 * at(1)).cos();
            if dims == 3 {
                wave *= (f[2] * 6.3 * at(2)).cos();
            }
            x.push(0.5 + 0.4 * wave + rng.random_range(-0.05..0.05));
        }
    }
    let mut y = vec![0f32; batch * classes * voxels];
    for (i, &value) in x.iter().enumerate() {
        let class = ((value.clamp(0.0, 0.999) * classes as f32) as usize).min(classes - 1);
        let (sample, voxel) = (i / voxels, i % voxels);
        y[(sample * classes + class) * voxels + voxel] = 1.0;
    }
    let shape = |channels| [vec![batch, channels], vec![side; dims]].concat();
    let mut out = Weights::default();
    out.tensors.insert(
        "x".into(),
        NamedTensor {
            shape: shape(1),
            values: x,
        },
    );
    out.tensors.insert(
        "y".into(),
        NamedTensor {
            shape: shape(classes),
            values: y,
        },
    );
    out
}

/// A stored tensor of rank `D` on `device`.
pub fn tensor<const D: usize>(t: &NamedTensor, device: &Device) -> Tensor<D> {
    let shape: [usize; D] = t
        .shape
        .clone()
        .try_into()
        .expect("tensor of the expected rank");
    Tensor::from_data(TensorData::new(t.values.clone(), shape), device)
}

/// Milliseconds of each of `steps` training steps of `model` (2D or 3D) on `batch` (from
/// [`synthetic_batch`]), after `warmup` untimed ones, with the convolutions at `precision`.
/// Each step ends by reading the loss, which waits for the device.
pub fn time_training_steps(
    model: &Weights,
    batch: &Weights,
    device: &ResolvedDevice,
    precision: Precision,
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>, TrainError> {
    let autodiff = device.device.clone().autodiff();
    let mixed = MixedPrecision::new(precision);
    if ModelSpec::from_weights(model)?.spatial_dims() == 3 {
        let (_, network) = load_model_3d(model, &autodiff)?;
        time_steps::<5, _>(network, batch, &autodiff, mixed, warmup, steps)
    } else {
        let (_, network) = load_model(model, &autodiff)?;
        time_steps::<4, _>(network, batch, &autodiff, mixed, warmup, steps)
    }
}

fn time_steps<const D: usize, N: Segmenter<D>>(
    mut network: N,
    batch: &Weights,
    device: &Device,
    mut mixed: MixedPrecision,
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>, TrainError> {
    let mut optimizer = optimizer(1e-4);
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let started = Instant::now();
        let x = tensor::<D>(&batch.tensors["x"], device);
        let y = tensor::<D>(&batch.tensors["y"], device);
        let (updated, _, _) = step(network, &mut optimizer, x, y, 1e-3, None, &mut mixed)?;
        network = updated;
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(times)
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}
