//! How the learning rate moves over one call of [`train`](crate::train::train).

/// How the learning rate moves over one call of [`train`](crate::train::train).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// The configured rate throughout: what FedAvg assumes within a round, where the rounds
    /// themselves are the long schedule.
    Constant,
    /// Linear warm-up over the first `warmup` fraction of steps, then a cosine decay to
    /// `floor` times the configured rate: for long central training.
    WarmupCosine { warmup: f64, floor: f64 },
}

impl Schedule {
    /// The usual central-training schedule: 5% warm-up, decay to 1%.
    pub const COSINE: Self = Self::WarmupCosine {
        warmup: 0.05,
        floor: 0.01,
    };

    /// The rate for step `step` (from 0) of `total`.
    pub fn rate(&self, base: f64, step: usize, total: usize) -> f64 {
        match *self {
            Self::Constant => base,
            Self::WarmupCosine { warmup, floor } => {
                let warmup_steps = (warmup * total as f64).ceil().max(1.0);
                let step = step as f64;
                if step < warmup_steps {
                    return base * (step + 1.0) / warmup_steps;
                }
                let span = (total as f64 - warmup_steps).max(1.0);
                let progress = ((step - warmup_steps) / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                base * (floor + (1.0 - floor) * cosine)
            }
        }
    }
}
