//! The coordinator's metrics for Prometheus. Events are counted as they happen (updates
//! accepted and refused, bytes, durations); the engine's present (runs, rounds, phase, sites,
//! ε) is read from its state at each scrape, so it cannot drift from what `run status` says.
//!
//! Labels are run ids, provisioned site names and fixed words: their number is bounded by the
//! project, never by what a peer sends.

use std::sync::Arc;
use std::time::Duration;

use alveolus_proto::domain::RunState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::engine::Coordinator;
use crate::error::CoordinatorError;

/// What crossed the wire, for the byte counters.
#[derive(Debug, Clone, Copy)]
pub enum Transfer {
    /// A site's update (plain or masked), received.
    Update,
    /// A global model, sent to a site or an admin.
    Model,
    /// A run's initial model, received from an admin.
    InitialModel,
}

impl Transfer {
    fn as_str(self) -> &'static str {
        match self {
            Transfer::Update => "update",
            Transfer::Model => "model",
            Transfer::InitialModel => "initial_model",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabels {
    site: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    site: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferLabels {
    transfer: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    run: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunStateLabels {
    run: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// The counters and histograms the coordinator updates as things happen.
#[derive(Debug)]
pub struct Metrics {
    updates_accepted: Family<SiteLabels, Counter>,
    updates_refused: Family<RefusalLabels, Counter>,
    received_bytes: Family<TransferLabels, Counter>,
    sent_bytes: Family<TransferLabels, Counter>,
    /// From the update's first byte to its acceptance or refusal.
    upload_seconds: Histogram,
    /// From a round's opening to its checkpoint being durable.
    round_seconds: Histogram,
    /// Aggregating, encoding and fsyncing one checkpoint with its manifest.
    checkpoint_write_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            updates_accepted: Family::default(),
            updates_refused: Family::default(),
            received_bytes: Family::default(),
            sent_bytes: Family::default(),
            // 10 ms to about 25 minutes: uploads end at the round's deadline.
            upload_seconds: Histogram::new(exponential_buckets(0.01, 2.5, 14)),
            // Half a second to about 2.3 hours.
            round_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 15)),
            // 1 ms to about 24 s.
            checkpoint_write_seconds: Histogram::new(exponential_buckets(0.001, 2.5, 12)),
        }
    }
}

impl Metrics {
    pub fn update_accepted(&self, site: &str, took: Duration) {
        self.updates_accepted
            .get_or_create(&SiteLabels { site: site.into() })
            .inc();
        self.upload_seconds.observe(took.as_secs_f64());
    }

    pub fn update_refused(&self, site: &str, error: &CoordinatorError, took: Duration) {
        self.updates_refused
            .get_or_create(&RefusalLabels {
                site: site.into(),
                reason: error.reason(),
            })
            .inc();
        self.upload_seconds.observe(took.as_secs_f64());
    }

    pub fn received(&self, transfer: Transfer, bytes: u64) {
        self.received_bytes
            .get_or_create(&TransferLabels {
                transfer: transfer.as_str(),
            })
            .inc_by(bytes);
    }

    pub fn sent(&self, transfer: Transfer, bytes: u64) {
        self.sent_bytes
            .get_or_create(&TransferLabels {
                transfer: transfer.as_str(),
            })
            .inc_by(bytes);
    }

    pub fn round_written(&self, round: Duration, checkpoint: Duration) {
        self.round_seconds.observe(round.as_secs_f64());
        self.checkpoint_write_seconds
            .observe(checkpoint.as_secs_f64());
    }
}

/// Registers the coordinator's metrics, its present state and the process gauges.
pub fn register(coordinator: &Arc<Coordinator>, registry: &mut Registry) {
    alveolus_telemetry::process::register(registry);
    let ours = registry.sub_registry_with_prefix("alveolus");
    let m = coordinator.metrics();
    ours.register(
        "updates_accepted",
        "Site updates folded into a round",
        m.updates_accepted.clone(),
    );
    ours.register(
        "updates_refused",
        "Site updates refused, by reason",
        m.updates_refused.clone(),
    );
    ours.register_with_unit(
        "received",
        "Payload bytes received, by transfer",
        Unit::Bytes,
        m.received_bytes.clone(),
    );
    ours.register_with_unit(
        "sent",
        "Payload bytes sent, by transfer",
        Unit::Bytes,
        m.sent_bytes.clone(),
    );
    ours.register_with_unit(
        "upload_duration",
        "Time from an update's first message to its acceptance or refusal",
        Unit::Seconds,
        m.upload_seconds.clone(),
    );
    ours.register_with_unit(
        "round_duration",
        "Time from a round's opening to its checkpoint being durable",
        Unit::Seconds,
        m.round_seconds.clone(),
    );
    ours.register_with_unit(
        "checkpoint_write_duration",
        "Time to aggregate, encode and fsync a round's checkpoint",
        Unit::Seconds,
        m.checkpoint_write_seconds.clone(),
    );
    ours.register_collector(Box::new(Present(coordinator.clone())));
}

/// The engine's present, read at each scrape.
struct Present(Arc<Coordinator>);

impl std::fmt::Debug for Present {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Present({})", self.0.project())
    }
}

impl Collector for Present {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let coordinator = &self.0;
        let runs = coordinator.runs();
        let (phase, current) = coordinator.phase();

        let started = Family::<RunLabels, Counter>::default();
        let finished = Family::<RunLabels, Counter>::default();
        let failed = Family::<RunLabels, Counter>::default();
        let states = Family::<RunStateLabels, Gauge>::default();
        let current_round = Family::<RunLabels, Gauge>::default();
        let epsilon = Family::<RunLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let loss = Family::<RunLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let dice = Family::<RunLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for run in &runs {
            let labels = RunLabels {
                run: run.run_id.clone(),
            };
            let done = run.rounds.len() as u64;
            let in_progress = match &current {
                Some((id, round)) if *id == run.run_id => Some(*round),
                _ => None,
            };
            let failed_round = u64::from(run.state == RunState::Failed);
            finished.get_or_create(&labels).inc_by(done);
            failed.get_or_create(&labels).inc_by(failed_round);
            started
                .get_or_create(&labels)
                .inc_by(done + u64::from(in_progress.is_some()) + failed_round);
            states
                .get_or_create(&RunStateLabels {
                    run: run.run_id.clone(),
                    state: run.state.as_str(),
                })
                .set(1);
            if let Some(round) = in_progress {
                current_round.get_or_create(&labels).set(round.into());
            }
            if let Some(last) = run.rounds.last() {
                if let Some(e) = last.epsilon {
                    epsilon.get_or_create(&labels).set(e);
                }
                loss.get_or_create(&labels).set(last.loss);
                dice.get_or_create(&labels).set(last.dice);
            }
        }
        emit(
            &mut encoder,
            "rounds_started",
            "Rounds opened, per run",
            None,
            &started,
        )?;
        emit(
            &mut encoder,
            "rounds_finished",
            "Rounds whose checkpoint is durable, per run",
            None,
            &finished,
        )?;
        emit(
            &mut encoder,
            "rounds_failed",
            "Rounds that could not make a model, per run",
            None,
            &failed,
        )?;
        emit(
            &mut encoder,
            "run_state",
            "1 for each run's state (running, completed, aborted, failed)",
            None,
            &states,
        )?;
        emit(
            &mut encoder,
            "current_round",
            "The round in progress of the running run",
            None,
            &current_round,
        )?;
        emit(
            &mut encoder,
            "run_epsilon",
            "Differential privacy: epsilon the run has spent at its delta",
            None,
            &epsilon,
        )?;
        emit(
            &mut encoder,
            "run_loss",
            "Sample-weighted mean training loss of the run's last finished round",
            None,
            &loss,
        )?;
        emit(
            &mut encoder,
            "run_dice",
            "Sample-weighted mean training Dice of the run's last finished round",
            None,
            &dice,
        )?;

        let phases = Family::<PhaseLabels, Gauge>::default();
        for name in ["idle", "open", "closing", "validating"] {
            phases
                .get_or_create(&PhaseLabels { phase: name })
                .set(i64::from(name == phase));
        }
        emit(
            &mut encoder,
            "round_phase",
            "1 for the engine's phase: idle (no run), open (taking updates), closing (aggregating and writing) or validating (the sites measuring a run's final model)",
            None,
            &phases,
        )?;

        let live = coordinator.live_sites();
        let connected = Gauge::<i64>::default();
        connected.set(live.len() as i64);
        emit(
            &mut encoder,
            "sites_connected",
            "Sites heard from within two long-polls",
            None,
            &connected,
        )?;
        let last_contact =
            Family::<SiteLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let contributions = Family::<SiteLabels, Counter>::default();
        for site in coordinator.sites() {
            let labels = SiteLabels {
                site: site.name.clone(),
            };
            last_contact
                .get_or_create(&labels)
                .set(site.last_contact_unix_ms as f64 / 1000.0);
            let rounds: usize = site.contributions.iter().map(|(_, r)| r.len()).sum();
            contributions.get_or_create(&labels).inc_by(rounds as u64);
        }
        emit(
            &mut encoder,
            "site_last_contact_timestamp",
            "When each site was last heard from (Unix time)",
            Some(&Unit::Seconds),
            &last_contact,
        )?;
        emit(
            &mut encoder,
            "site_rounds_contributed",
            "Rounds that aggregated an update of each site, over all runs",
            None,
            &contributions,
        )?;
        Ok(())
    }
}

fn emit<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: &M,
) -> Result<(), std::fmt::Error> {
    let metric_type: MetricType = metric.metric_type();
    metric.encode(encoder.encode_descriptor(name, help, unit, metric_type)?)
}
