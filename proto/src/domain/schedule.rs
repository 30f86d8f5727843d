//! The learning rate over a run's rounds: a linear warm-up, then constant or a cosine decay. The
//! coordinator works out each round's rate and sends it with the task, so every site of a round
//! trains at the same rate and a site needs to know nothing of the schedule.

use serde::{Deserialize, Serialize};

use super::{DomainError, invalid};
use crate::pb;

/// How the rate moves from round to round, around the run's `training.learning_rate` (the peak).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearningRateSchedule {
    /// Rounds over which the rate climbs linearly to the peak: round r ≤ `warmup_rounds` trains
    /// at peak × r / `warmup_rounds`. Large-batch and adaptive-server runs diverge without it.
    pub warmup_rounds: u32,
    /// After the warm-up, half a cosine from the peak down to `final_fraction` × peak at the
    /// last round (Loshchilov and Hutter's SGDR without restarts); constant otherwise.
    pub cosine: bool,
    /// Where the cosine ends, as a fraction of the peak, in [0, 1].
    pub final_fraction: f64,
}

impl LearningRateSchedule {
    pub fn validate(&self, rounds: u32) -> Result<(), DomainError> {
        if self.warmup_rounds > rounds {
            return Err(invalid(
                "schedule.warmup_rounds",
                format!("{} warm-up rounds in a run of {rounds}", self.warmup_rounds),
            ));
        }
        if !(0.0..=1.0).contains(&self.final_fraction) {
            return Err(invalid(
                "schedule.final_fraction",
                format!("{} is not in [0, 1]", self.final_fraction),
            ));
        }
        Ok(())
    }

    /// The rate of `round` (1-based) of `rounds`, for a peak rate `peak`.
    pub fn rate(&self, peak: f64, round: u32, rounds: u32) -> f64 {
        let round = round.clamp(1, rounds.max(1));
        if round <= self.warmup_rounds {
            return peak * f64::from(round) / f64::from(self.warmup_rounds);
        }
        if !self.cosine {
            return peak;
        }
        // The first round after the warm-up is at the peak, the last at the floor.
        let span = rounds - self.warmup_rounds - 1;
        let progress = if span == 0 {
            0.0
        } else {
            f64::from(round - self.warmup_rounds - 1) / f64::from(span)
        };
        let floor = peak * self.final_fraction;
        floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// `warm-up over 2 rounds, then a cosine down to 10 % of the peak`.
impl std::fmt::Display for LearningRateSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.warmup_rounds > 0 {
            write!(f, "warm-up over {} rounds, then ", self.warmup_rounds)?;
        }
        if self.cosine {
            write!(
                f,
                "a cosine down to {} % of the peak",
                self.final_fraction * 100.0
            )
        } else {
            write!(f, "constant")
        }
    }
}

impl From<LearningRateSchedule> for pb::LearningRateSchedule {
    fn from(s: LearningRateSchedule) -> Self {
        Self {
            warmup_rounds: s.warmup_rounds,
            cosine: s.cosine,
            final_fraction: s.final_fraction,
        }
    }
}

impl From<pb::LearningRateSchedule> for LearningRateSchedule {
    /// Checked with the run's round count in `RunConfig::validate`.
    fn from(s: pb::LearningRateSchedule) -> Self {
        Self {
            warmup_rounds: s.warmup_rounds,
            cosine: s.cosine,
            final_fraction: s.final_fraction,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Rates worked out by hand: a warm-up of 2 then a cosine over rounds 3..=6 down to 10 %.
    #[test]
    fn warm_up_then_cosine_reaches_the_peak_and_then_the_floor() {
        let s = LearningRateSchedule {
            warmup_rounds: 2,
            cosine: true,
            final_fraction: 0.1,
        };
        let rates: Vec<f64> = (1..=6).map(|r| s.rate(1.0, r, 6)).collect();
        // Cosine points at 0, 1/3, 2/3, 1 of half a period.
        let expected = [
            0.5,
            1.0,
            1.0,
            0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI / 3.0).cos()),
            0.1 + 0.9 * 0.5 * (1.0 + (2.0 * std::f64::consts::PI / 3.0).cos()),
            0.1,
        ];
        for (r, (a, b)) in rates.iter().zip(expected).enumerate() {
            assert!(close(*a, b), "round {}: {a} != {b}", r + 1);
        }
        assert!(close(expected[3], 0.775) && close(expected[4], 0.325));
    }

    #[test]
    fn without_cosine_the_rate_stays_at_the_peak_after_the_warm_up() {
        let s = LearningRateSchedule {
            warmup_rounds: 4,
            cosine: false,
            final_fraction: 0.0,
        };
        assert!(close(s.rate(0.002, 1, 10), 0.0005));
        assert!(close(s.rate(0.002, 4, 10), 0.002));
        assert!(close(s.rate(0.002, 10, 10), 0.002));
        // A one-round run after its warm-up, and rounds past the end, stay defined.
        let cosine = LearningRateSchedule {
            cosine: true,
            warmup_rounds: 0,
            ..s
        };
        assert!(close(cosine.rate(1.0, 1, 1), 1.0));
        assert!(close(cosine.rate(1.0, 7, 5), 0.0));
    }

    #[test]
    fn schedules_that_cannot_work_are_refused() {
        let s = LearningRateSchedule {
            warmup_rounds: 6,
            cosine: true,
            final_fraction: 0.0,
        };
        assert!(s.validate(6).is_ok());
        let e = s.validate(5).unwrap_err().to_string();
        assert!(e.contains("6 warm-up rounds in a run of 5"), "{e}");
        for f in [-0.1, 1.5, f64::NAN] {
            let e = LearningRateSchedule {
                final_fraction: f,
                ..s
            }
            .validate(6)
            .unwrap_err()
            .to_string();
            assert!(e.contains("final_fraction"), "{e}");
        }
    }
}
