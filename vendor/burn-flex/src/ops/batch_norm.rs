//! Alveolus: a training batch norm and its gradient in two passes over the activation each, and
//! an inference one in one pass (the crate's `PATCH.md` says why), instead of burn's defaults
//! of a dozen and five tensor operations.
//!
//! f32 only; the callers cast other float types. Sums run in f64, so that the statistics of a
//! large batch do not lose what f32 additions would.

use alloc::vec;
use alloc::vec::Vec;
use burn_std::Shape;

use super::f32s::{contiguous, tensor};
use crate::FlexTensor;

/// `[batch, channels, ..]` as its channel count and the length of each channel's run.
fn runs(shape: &Shape) -> (usize, usize) {
    let channels = shape[1];
    // At least 1, so that an empty tensor makes empty runs rather than a panic.
    let run = shape.iter().skip(2).product::<usize>().max(1);
    (channels, run)
}

/// The runs of channel `c` in `data` (one per batch item).
fn channel(data: &[f32], channels: usize, run: usize, c: usize) -> impl Iterator<Item = &[f32]> {
    data.chunks_exact(run.max(1))
        .skip(c)
        .step_by(channels.max(1))
}

/// Runs `f` for each channel, in parallel where there are threads.
fn per_channel<T: Send, F: Fn(usize) -> T + Sync + Send>(channels: usize, f: F) -> Vec<T> {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        (0..channels).into_par_iter().map(f).collect()
    }
    #[cfg(not(feature = "rayon"))]
    {
        (0..channels).map(f).collect()
    }
}

/// Fills each run of `out` (one channel of one batch item) with `f(run index, run)`, in
/// parallel where there are threads.
fn per_run<F: Fn(usize, &mut [f32]) + Sync + Send>(out: &mut [f32], run: usize, f: F) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        out.par_chunks_exact_mut(run)
            .enumerate()
            .for_each(|(i, o)| f(i, o));
    }
    #[cfg(not(feature = "rayon"))]
    for (i, o) in out.chunks_exact_mut(run).enumerate() {
        f(i, o);
    }
}

/// Normalises `x` with its own per-channel statistics; returns the output and the mean and
/// biased variance, `[channels]` each.
pub(crate) fn train(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> [FlexTensor; 3] {
    let x = contiguous(x);
    let (gamma, beta) = (contiguous(gamma), contiguous(beta));
    let shape = x.layout().shape().clone();
    let (channels, run) = runs(&shape);
    let data = x.storage::<f32>();
    let count = (data.len() / channels.max(1)).max(1) as f64;
    let stats = per_channel(channels, |c| {
        let sum: f64 = channel(data, channels, run, c)
            .map(|r| r.iter().map(|&v| v as f64).sum::<f64>())
            .sum();
        let mean = sum / count;
        let squares: f64 = channel(data, channels, run, c)
            .map(|r| r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
            .sum();
        (mean, squares / count)
    });
    let out = normalise(data, channels, run, &gamma, &beta, &stats, epsilon);
    let column = |f: fn(&(f64, f64)) -> f64| {
        tensor(
            stats.iter().map(|s| f(s) as f32).collect(),
            Shape::from(vec![channels]),
        )
    };
    [tensor(out, shape), column(|s| s.0), column(|s| s.1)]
}

/// `x * gamma / sqrt(variance + epsilon) + (beta - mean * gamma / sqrt(variance + epsilon))`,
/// channel by channel, with each channel's `(mean, variance)` in `stats`.
fn normalise(
    data: &[f32],
    channels: usize,
    run: usize,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    stats: &[(f64, f64)],
    epsilon: f64,
) -> Vec<f32> {
    let (gamma, beta) = (gamma.storage::<f32>(), beta.storage::<f32>());
    let affine: Vec<(f32, f32)> = stats
        .iter()
        .enumerate()
        .map(|(c, &(mean, variance))| {
            let scale = gamma[c] as f64 / (variance + epsilon).sqrt();
            (scale as f32, (beta[c] as f64 - mean * scale) as f32)
        })
        .collect();
    let mut out = vec![0f32; data.len()];
    per_run(&mut out, run, |i, o| {
        let (scale, shift) = affine[i % channels];
        let x = &data[i * run..][..run];
        o.iter_mut()
            .zip(x)
            .for_each(|(o, &x)| *o = x * scale + shift);
    });
    out
}

/// Normalises `x` with given statistics (inference, on running statistics): one pass, where
/// burn's default makes five.
pub(crate) fn inference(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    mean: &FlexTensor,
    variance: &FlexTensor,
    epsilon: f64,
) -> [FlexTensor; 1] {
    let x = contiguous(x);
    let (gamma, beta, mean, variance) = (
        contiguous(gamma),
        contiguous(beta),
        contiguous(mean),
        contiguous(variance),
    );
    let shape = x.layout().shape().clone();
    let (channels, run) = runs(&shape);
    let stats: Vec<(f64, f64)> = mean
        .storage::<f32>()
        .iter()
        .zip(variance.storage::<f32>())
        .map(|(&m, &v)| (m as f64, v as f64))
        .collect();
    let out = normalise(
        x.storage::<f32>(),
        channels,
        run,
        &gamma,
        &beta,
        &stats,
        epsilon,
    );
    [tensor(out, shape)]
}

/// The gradients of [`train`] with respect to `x`, `gamma` and `beta`.
pub(crate) fn train_backward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    mean: &FlexTensor,
    variance: &FlexTensor,
    epsilon: f64,
    output_grad: &FlexTensor,
) -> [FlexTensor; 3] {
    let x = contiguous(x);
    let dy = contiguous(output_grad);
    let (gamma, mean, variance) = (contiguous(gamma), contiguous(mean), contiguous(variance));
    let shape = x.layout().shape().clone();
    let (channels, run) = runs(&shape);
    let (data, dy) = (x.storage::<f32>(), dy.storage::<f32>());
    let (gamma, mean, variance) = (
        gamma.storage::<f32>(),
        mean.storage::<f32>(),
        variance.storage::<f32>(),
    );
    let count = (data.len() / channels.max(1)).max(1) as f64;
    let inv_std: Vec<f64> = variance
        .iter()
        .map(|&v| 1.0 / (v as f64 + epsilon).sqrt())
        .collect();
    // Per channel: the sum of the output gradient (beta's gradient) and of its product with
    // the normalised input (gamma's).
    let sums = per_channel(channels, |c| {
        let (m, s) = (mean[c] as f64, inv_std[c]);
        channel(data, channels, run, c)
            .zip(channel(dy, channels, run, c))
            .fold((0f64, 0f64), |(dy_sum, dyx_sum), (x, dy)| {
                let (a, b) = x.iter().zip(dy).fold((0f64, 0f64), |(a, b), (&x, &dy)| {
                    (a + dy as f64, b + dy as f64 * (x as f64 - m) * s)
                });
                (dy_sum + a, dyx_sum + b)
            })
    });
    // dx = gamma / std * (dy - mean(dy) - x̂ * mean(dy * x̂))
    //    = scale * dy - slope * (x - mean) - scale * mean(dy).
    let coefficients: Vec<[f32; 4]> = (0..channels)
        .map(|c| {
            let (dy_sum, dyx_sum) = sums[c];
            let scale = gamma[c] as f64 * inv_std[c];
            let slope = scale * inv_std[c] * dyx_sum / count;
            [
                scale as f32,
                slope as f32,
                mean[c],
                (scale * dy_sum / count) as f32,
            ]
        })
        .collect();
    let mut dx = vec![0f32; data.len()];
    per_run(&mut dx, run, |i, out| {
        let [scale, slope, mean, shift] = coefficients[i % channels];
        let (x, dy) = (&data[i * run..][..run], &dy[i * run..][..run]);
        out.iter_mut()
            .zip(x.iter().zip(dy))
            .for_each(|(o, (&x, &dy))| *o = scale * dy - slope * (x - mean) - shift);
    });
    let column = |values: Vec<f32>| tensor(values, Shape::from(vec![channels]));
    [
        tensor(dx, shape),
        column(sums.iter().map(|s| s.1 as f32).collect()),
        column(sums.iter().map(|s| s.0 as f32).collect()),
    ]
}
