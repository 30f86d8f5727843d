//! The coordinator's one clock for deadlines and liveness: tokio's, which tests can pause and
//! move on (`tokio::time::pause`, `advance`). Wall-clock time is only written into records.

/// A point in time on the coordinator's clock.
pub type Instant = tokio::time::Instant;

/// Now, on the coordinator's clock.
pub fn now() -> Instant {
    Instant::now()
}

/// Wall-clock milliseconds since the Unix epoch, for what runs and sites record.
pub use alveolus_proto::unix_ms;
