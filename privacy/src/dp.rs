//! The two halves of DP-FedAvg's mechanism: a site bounds its influence by clipping its update
//! to an L2 norm, and the sum of the clipped updates gets Gaussian noise scaled to that norm.

use alveolus_proto::weights::Weights;
use rand::Rng;

/// L2 norm of every value of every tensor (running statistics included: they come from the
/// site's data too).
pub fn l2_norm(update: &Weights) -> f64 {
    update
        .tensors
        .values()
        .flat_map(|t| &t.values)
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales `update` down so that its L2 norm is at most `clip`; returns the norm it had.
pub fn clip(update: &mut Weights, clip: f64) -> f64 {
    let norm = l2_norm(update);
    if norm > clip {
        // f32 rounding can leave the norm a hair above the bound; aim just below it.
        let scale = (clip / norm * (1.0 - 1e-6)) as f32;
        for tensor in update.tensors.values_mut() {
            for v in &mut tensor.values {
                *v *= scale;
            }
        }
    }
    norm
}

/// One draw of N(0, 1) (Box–Muller from two uniforms of `rng`).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    // 1 - u is in (0, 1]: its logarithm is finite.
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// One draw of N(0, `std`²).
pub fn gaussian_noise(std: f64, rng: &mut impl Rng) -> f64 {
    std * standard_normal(rng)
}

/// Under secure aggregation the sites add the noise: each adds N(0, σ²) with this σ, so that
/// any `threshold` of them together add at least the run's N(0, (z·C)²).
pub fn noise_share_std(noise_multiplier: f64, clip_norm: f64, threshold: u32) -> f64 {
    noise_multiplier * clip_norm / f64::from(threshold).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alveolus_proto::weights::Tensor;
    use rand::SeedableRng;

    fn update(values: Vec<f32>) -> Weights {
        let mut w = Weights::default();
        w.tensors
            .insert("a".into(), Tensor::new(vec![values.len()], values).unwrap());
        w
    }

    #[test]
    fn clipped_norms_never_exceed_the_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let n = rng.random_range(1..500);
            let scale = 10f32.powi(rng.random_range(-3..4));
            let values: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() - 0.5) * scale)
                .collect();
            let mut u = update(values.clone());
            let bound = rng.random_range(0.01..5.0);
            let before = clip(&mut u, bound);
            let after = l2_norm(&u);
            assert!(after <= bound, "{after} > {bound}");
            if before <= bound {
                assert_eq!(
                    u.tensors["a"].values, values,
                    "small updates are left as they are"
                );
            } else {
                // Direction kept: the clipped update is a positive multiple of the original.
                assert!((after - bound).abs() < 1e-4 * bound);
            }
        }
    }

    #[test]
    fn noise_has_the_asked_standard_deviation() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (z, c) = (1.3, 0.7);
        let mut values = vec![0.0; 200_000];
        for v in &mut values {
            *v += gaussian_noise(z * c, &mut rng);
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        // Standard error of the sample std is std/sqrt(2n): 0.2 % here; allow 1 %.
        assert!((std - z * c).abs() < 0.01 * z * c, "{std}");
        assert!(mean.abs() < 0.01 * z * c, "{mean}");
        // Tails as a Gaussian's: about 4.55 % beyond two standard deviations.
        let beyond = values.iter().filter(|v| v.abs() > 2.0 * z * c).count() as f64 / n;
        assert!((beyond - 0.0455).abs() < 0.003, "{beyond}");
    }

    #[test]
    fn threshold_many_noise_shares_add_up_to_the_runs_noise() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let (z, c, t) = (1.1, 0.5, 5);
        let share = noise_share_std(z, c, t);
        let mut sums = vec![0.0; 100_000];
        for _ in 0..t {
            for v in &mut sums {
                *v += gaussian_noise(share, &mut rng);
            }
        }
        let n = sums.len() as f64;
        let std = (sums.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
        assert!((std - z * c).abs() < 0.01 * z * c, "{std} vs {}", z * c);
    }
}
