//! Rényi-DP accountant for the Poisson-sampled Gaussian mechanism.

use std::f64::consts::{LN_2, PI};

/// The orders dp-accounting's `RdpAccountant` uses by default: 1.1 to 10.9 by tenths, 11 to 63,
/// and 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + x as f64 / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// Terms of the fractional-order series summed before giving up on an order (as dp-accounting).
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountantError {
    #[error("sample rate must be in [0, 1], got {0}")]
    SampleRate(f64),
    #[error("noise multiplier must be a non-negative number, got {0}")]
    Noise(f64),
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
}

/// ε spent at a δ, and the RDP order that gave it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PrivacySpent {
    pub epsilon: f64,
    pub delta: f64,
    pub order: f64,
}

/// Accumulated RDP at each order.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }
}

impl RdpAccountant {
    /// Composes `steps` runs of the Gaussian mechanism with noise multiplier `noise`, each on
    /// a Poisson sample of rate `sample_rate`.
    pub fn compose_sampled_gaussian(
        &mut self,
        sample_rate: f64,
        noise: f64,
        steps: u64,
    ) -> Result<(), AccountantError> {
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(AccountantError::SampleRate(sample_rate));
        }
        if !noise.is_finite() || noise < 0.0 {
            return Err(AccountantError::Noise(noise));
        }
        for (rdp, &order) in self.rdp.iter_mut().zip(&self.orders) {
            *rdp += steps as f64 * sampled_gaussian_rdp(sample_rate, noise, order);
        }
        Ok(())
    }

    /// The smallest ε over the orders at which everything composed so far is (ε, δ)-DP.
    pub fn epsilon(&self, delta: f64) -> Result<PrivacySpent, AccountantError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(AccountantError::Delta(delta));
        }
        let mut best = PrivacySpent {
            epsilon: f64::INFINITY,
            delta,
            order: self.orders[0],
        };
        for (&order, &rdp) in self.orders.iter().zip(&self.rdp) {
            let epsilon = if rdp < 0.0 || delta * delta + (-rdp).exp_m1() > 0.0 {
                // Bounded through the KL divergence: δ ≥ sqrt(1 - exp(-KL)) needs no ε.
                0.0
            } else if order > 1.01 {
                rdp + (-1.0 / order).ln_1p() - (delta * order).ln() / (order - 1.0)
            } else {
                f64::INFINITY
            };
            if epsilon < best.epsilon {
                best.epsilon = epsilon;
                best.order = order;
            }
        }
        best.epsilon = best.epsilon.max(0.0);
        Ok(best)
    }
}

/// ε after `rounds` rounds of DP-FedAvg: what `alveolus privacy plan` prints and what the
/// coordinator checks a run's budget against.
pub fn epsilon_after(
    sample_rate: f64,
    noise: f64,
    rounds: u64,
    delta: f64,
) -> Result<PrivacySpent, AccountantError> {
    let mut accountant = RdpAccountant::default();
    accountant.compose_sampled_gaussian(sample_rate, noise, rounds)?;
    accountant.epsilon(delta)
}

/// ε a run with `privacy` has spent after `rounds` rounds. Every site takes part in every
/// round: sample rate 1. Settings the accountant cannot take (a run validated them) count as
/// an unbounded ε.
pub fn run_epsilon(privacy: &alveolus_proto::domain::PrivacyConfig, rounds: u32) -> f64 {
    epsilon_after(1.0, privacy.noise_multiplier, rounds.into(), privacy.delta)
        .map(|spent| spent.epsilon)
        .unwrap_or(f64::INFINITY)
}

/// RDP of one sampled Gaussian mechanism at `order`.
fn sampled_gaussian_rdp(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if order.is_infinite() || sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 {
        log_a_integer(q, sigma, order as u64)
    } else {
        log_a_fractional(q, sigma, order)
    };
    log_a / (order - 1.0)
}

fn log_a_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log1mq = (-q).ln_1p();
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (i, a) = (i as f64, alpha as f64);
        let log_coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        log_a = log_add(log_a, log_coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// Sec. 3.3 of Mironov, Talwar and Zhang (arXiv:1908.10530): the two halves of A_α around
/// z0, summed until their terms fall 30 nats below the total.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (2f64.sqrt() * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (2f64.sqrt() * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    // Did not converge: the order is left out of the minimum, as dp-accounting does.
    f64::INFINITY
}

/// log of the binomial coefficient through log-gamma (log of its magnitude for fractional n).
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log(erfc(x)), accurate far into the tail: log 2 + log Φ(-x√2).
fn log_erfc(x: f64) -> f64 {
    LN_2 + log_ndtr(-x * 2f64.sqrt())
}

/// log of the standard normal CDF, as scipy's `log_ndtr`: direct where Φ is representable
/// with full relative precision, the asymptotic series of the Mills ratio below -20.
fn log_ndtr(x: f64) -> f64 {
    if x > 6.0 {
        // Φ(x) = 1 - Φ(-x), and Φ(-x) is tiny.
        return (-0.5 * libm::erfc(x / 2f64.sqrt())).ln_1p();
    }
    if x > -20.0 {
        return (0.5 * libm::erfc(-x / 2f64.sqrt())).ln();
    }
    // log Φ(x) = -x²/2 - log(-x) - log(2π)/2 + log(1 + Σ (-1)^k (2k-1)!! / x^(2k)).
    let x2 = x * x;
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..16 {
        term *= -((2 * k - 1) as f64) / x2;
        sum += term;
    }
    -x2 / 2.0 - (-x).ln() - 0.5 * (2.0 * PI).ln() + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sampling_spends_nothing_and_no_noise_everything() {
        assert_eq!(epsilon_after(0.0, 1.0, 100, 1e-5).unwrap().epsilon, 0.0);
        assert!(
            epsilon_after(0.5, 0.0, 1, 1e-5)
                .unwrap()
                .epsilon
                .is_infinite()
        );
    }

    /// The full-participation Gaussian mechanism has RDP α/(2σ²) exactly.
    #[test]
    fn unsampled_gaussian_has_the_closed_form() {
        let mut a = RdpAccountant::default();
        a.compose_sampled_gaussian(1.0, 2.0, 3).unwrap();
        for (order, rdp) in a.orders.iter().zip(&a.rdp) {
            assert!((rdp - 3.0 * order / 8.0).abs() < 1e-12);
        }
    }

    #[test]
    fn more_rounds_less_noise_or_more_sampling_cost_more() {
        let base = epsilon_after(0.1, 1.0, 100, 1e-5).unwrap().epsilon;
        assert!(epsilon_after(0.1, 1.0, 200, 1e-5).unwrap().epsilon > base);
        assert!(epsilon_after(0.1, 0.8, 100, 1e-5).unwrap().epsilon > base);
        assert!(epsilon_after(0.2, 1.0, 100, 1e-5).unwrap().epsilon > base);
        assert!(epsilon_after(0.1, 1.0, 100, 1e-6).unwrap().epsilon > base);
    }

    #[test]
    fn log_ndtr_is_continuous_across_its_branches() {
        for x in [-20.0f64, 6.0] {
            let (below, above) = (log_ndtr(x - 1e-9), log_ndtr(x + 1e-9));
            assert!(
                (below - above).abs() < 1e-6 * below.abs().max(1e-12),
                "{x}: {below} {above}"
            );
        }
        // Φ(-40) = 3.655893540915e-350 underflows f64; its log does not.
        assert!((log_ndtr(-40.0) - (-804.6084420137538)).abs() < 1e-9);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(epsilon_after(1.5, 1.0, 1, 1e-5).is_err());
        assert!(epsilon_after(0.1, -1.0, 1, 1e-5).is_err());
        assert!(epsilon_after(0.1, f64::NAN, 1, 1e-5).is_err());
        assert!(epsilon_after(0.1, 1.0, 1, 0.0).is_err());
        assert!(epsilon_after(0.1, 1.0, 1, 1.0).is_err());
    }
}
