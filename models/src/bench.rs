//! Timing of training steps, for `alveolus bench train`: the step [`train`](crate::train::train)
//! takes, on a fixed batch, on any device.

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::train::{TrainError, load_model, optimizer, step};
use crate::{NamedTensor, ResolvedDevice, Weights};

/// A reproducible batch: smooth random intensities and labels drawn from them, so every class
/// is present. Stored as the tensors `x` (`[batch, 1, n, n]`) and `y` (one-hot) for PyTorch.
pub fn synthetic_batch(batch: usize, side: usize, classes: usize, seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let pixels = side * side;
    let mut x = Vec::with_capacity(batch * pixels);
    for _ in 0..batch {
        let (fx, fy, phase) = (
            rng.random_range(1.0..4.0f32),
            rng.random_range(1.0..4.0f32),
            rng.random_range(0.0..6.3f32),
        );
        for row in 0..side {
            for col in 0..side {
                let (u, v) = (col as f32 / side as f32, row as f32 / side as f32);
                let wave = (fx * 6.3 * u + phase).sin() * (fy * 6.3 * v).cos();
                x.push(0.5 + 0.4 * wave + rng.random_range(-0.05..0.05));
            }
        }
    }
    let mut y = vec![0f32; batch * classes * pixels];
    for (i, &value) in x.iter().enumerate() {
        let class = ((value.clamp(0.0, 0.999) * classes as f32) as usize).min(classes - 1);
        let (sample, pixel) = (i / pixels, i % pixels);
        y[(sample * classes + class) * pixels + pixel] = 1.0;
    }
    let mut out = Weights::default();
    out.tensors.insert(
        "x".into(),
        NamedTensor {
            shape: vec![batch, 1, side, side],
            values: x,
        },
    );
    out.tensors.insert(
        "y".into(),
        NamedTensor {
            shape: vec![batch, classes, side, side],
            values: y,
        },
    );
    out
}

fn tensor(t: &NamedTensor, device: &burn::tensor::Device) -> Tensor<4> {
    let shape: [usize; 4] = t.shape.clone().try_into().expect("a 4-d batch tensor");
    Tensor::from_data(TensorData::new(t.values.clone(), shape), device)
}

/// Milliseconds of each of `steps` training steps of `model` on `batch` (from
/// [`synthetic_batch`]), after `warmup` untimed ones. Each step ends by reading the loss,
/// which waits for the device.
pub fn time_training_steps(
    model: &Weights,
    batch: &Weights,
    device: &ResolvedDevice,
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>, TrainError> {
    let autodiff = device.device.clone().autodiff();
    let (_, mut network) = load_model(model, &autodiff)?;
    let mut optimizer = optimizer(1e-4);
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let started = Instant::now();
        let x = tensor(&batch.tensors["x"], &autodiff);
        let y = tensor(&batch.tensors["y"], &autodiff);
        let (updated, _, _) = step(network, &mut optimizer, x, y, 1e-3)?;
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
