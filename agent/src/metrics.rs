//! The agent's metrics for Prometheus: what the site's IT and the researcher want to see of
//! one site (time spent training, samples, traffic, reconnections, the last round). Counts and
//! durations only: nothing of the site's data beyond how many samples a round used.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug)]
pub struct AgentMetrics {
    /// Local training of one round, from the model's arrival to the update's.
    training_seconds: Histogram,
    samples: Counter,
    sent_bytes: Counter,
    received_bytes: Counter,
    /// Sessions lost to a transport error and retried.
    reconnects: Counter,
    /// Rounds whose update the coordinator accepted.
    rounds: Counter,
    last_round: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            // 0.1 s to about 4.6 hours.
            training_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 18)),
            samples: Counter::default(),
            sent_bytes: Counter::default(),
            received_bytes: Counter::default(),
            reconnects: Counter::default(),
            rounds: Counter::default(),
            last_round: Gauge::default(),
        }
    }
}

impl AgentMetrics {
    /// The process gauges and the agent's metrics, in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        alveolus_telemetry::process::register(registry);
        let ours = registry.sub_registry_with_prefix("alveolus_agent");
        ours.register_with_unit(
            "training_duration",
            "Local training time of one round",
            Unit::Seconds,
            self.training_seconds.clone(),
        );
        ours.register(
            "samples",
            "Training samples used, summed over rounds",
            self.samples.clone(),
        );
        ours.register_with_unit(
            "sent",
            "Protocol bytes sent (updates and secure-aggregation steps)",
            Unit::Bytes,
            self.sent_bytes.clone(),
        );
        ours.register_with_unit(
            "received",
            "Protocol bytes received (models and secure-aggregation steps)",
            Unit::Bytes,
            self.received_bytes.clone(),
        );
        ours.register(
            "reconnects",
            "Connections to the coordinator lost and tried again",
            self.reconnects.clone(),
        );
        ours.register(
            "rounds",
            "Rounds whose update the coordinator accepted",
            self.rounds.clone(),
        );
        ours.register(
            "last_round",
            "The last round this site was given",
            self.last_round.clone(),
        );
    }

    pub(crate) fn round_given(&self, round: u32) {
        self.last_round.set(round.into());
    }

    pub(crate) fn trained(&self, took: Duration, samples: usize) {
        self.training_seconds.observe(took.as_secs_f64());
        self.samples.inc_by(samples as u64);
    }

    pub(crate) fn traffic(&self, sent: u64, received: u64) {
        self.sent_bytes.inc_by(sent);
        self.received_bytes.inc_by(received);
    }

    pub(crate) fn update_accepted(&self) {
        self.rounds.inc();
    }

    pub(crate) fn reconnecting(&self) {
        self.reconnects.inc();
    }
}
