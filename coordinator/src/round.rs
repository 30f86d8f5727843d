//! One round in progress: which updates it admits, what it has received, whether it may close
//! at a given moment, and what its updates add up to. No lock, no clock reading and no I/O:
//! the coordinator ([`crate::engine`]) decides when to ask and what to do with the answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use alveolus_privacy::secagg::RoundContext;
use alveolus_proto::domain::{Metrics, RunConfig, SiteReport, UpdateHeader};
use alveolus_proto::weights::Weights;

use crate::aggregate::Aggregator;
use crate::clock::Instant;
use crate::error::CoordinatorError;
use crate::secure::SecureRound;

/// An update that went into the round.
struct Report {
    site: String,
    samples: u64,
    metrics: Metrics,
    train_seconds: Option<f64>,
    bytes: u64,
}

/// The round in progress: its starting model and the running aggregate.
pub struct Round {
    pub run_id: String,
    pub round: u32,
    pub base_version: String,
    pub base: Arc<Weights>,
    /// When the round opened: its duration, for the metrics, ends when its checkpoint is durable.
    pub opened: Instant,
    pub deadline: Instant,
    /// Sites handed this round's task; the round waits for all of them until the deadline.
    participants: BTreeSet<String>,
    reports: Vec<Report>,
    /// Sites whose update was refused for its norm: not asked again this round, not waited for.
    refused: BTreeSet<String>,
    /// Rounds in the clear only: a secure round's sum is in `secure`.
    aggregator: Option<Aggregator>,
    /// Present when the run uses secure aggregation: the masked sum and the protocol's phases.
    pub secure: Option<SecureRound>,
    /// Times closing the round failed to write its checkpoint or record (a full disk, say);
    /// each failure doubles the wait before the next try.
    write_failures: u32,
    /// Not closed again before this: a failing disk is not hammered every tick.
    retry_at: Option<Instant>,
    /// Cross-site evaluation, in the run's last round: each site's local model (this round's
    /// model plus its update), written to the registry when the round closes. Memory
    /// O(model x sites), in that round only.
    local_models: Option<BTreeMap<String, Weights>>,
}

/// Longest wait between two tries at writing a round that did not write.
const MAX_WRITE_RETRY: Duration = Duration::from_secs(30);

/// What a closed round adds up to.
pub struct Outcome {
    pub weights: Weights,
    /// The samples behind it (0 under DP, where every site weighs 1 and counts stay home).
    pub samples: u64,
    /// Sample-weighted mean loss and Dice.
    pub metrics: Metrics,
    /// The sites whose updates it holds, sorted.
    pub sites: Vec<String>,
    /// What each site's header said, by site; empty for a secure round, whose headers say
    /// nothing.
    pub site_reports: Vec<SiteReport>,
}

impl Round {
    /// Round `round` of run `run_id` (configured by `config`) from model `version`, opened at
    /// `now`.
    pub fn open(
        run_id: &str,
        config: &RunConfig,
        round: u32,
        version: String,
        base: Weights,
        now: Instant,
    ) -> Self {
        let deadline = Duration::from_secs(config.deadline_seconds.into());
        let secure = config.secure_aggregation.map(|s| {
            let context = RoundContext {
                run_id: run_id.to_string(),
                round,
            };
            SecureRound::new(context, s.threshold, base.num_values(), deadline, now)
        });
        Self {
            run_id: run_id.to_string(),
            round,
            base_version: version,
            opened: now,
            deadline: now + deadline,
            participants: BTreeSet::new(),
            reports: Vec::new(),
            refused: BTreeSet::new(),
            aggregator: secure
                .is_none()
                .then(|| Aggregator::new(&base, config.aggregation.rule, config.privacy.as_ref())),
            secure,
            base: Arc::new(base),
            write_failures: 0,
            retry_at: None,
            local_models: (config.cross_site_evaluation && round == config.rounds)
                .then(BTreeMap::new),
        }
    }

    /// Whether a message about `run_id`'s round `round` is about this round.
    pub fn is_round(&self, run_id: &str, round: u32) -> Result<(), CoordinatorError> {
        if run_id != self.run_id {
            return Err(CoordinatorError::WrongRun {
                got: run_id.to_string(),
                expected: self.run_id.clone(),
            });
        }
        if round != self.round {
            return Err(CoordinatorError::WrongRound {
                got: round,
                expected: self.round,
            });
        }
        Ok(())
    }

    /// Whether an update with `header` from `site` belongs to this round.
    pub fn admits(&self, site: &str, header: &UpdateHeader) -> Result<(), CoordinatorError> {
        self.is_round(&header.run_id, header.round)?;
        if header.base_version != self.base_version {
            return Err(CoordinatorError::WrongBase {
                got: header.base_version.clone(),
                expected: self.base_version.clone(),
            });
        }
        match (&self.secure, header.masked) {
            (Some(_), false) => {
                return Err(CoordinatorError::SecureAggregation(format!(
                    "round {} is securely aggregated: only a masked update is accepted",
                    self.round
                )));
            }
            (None, true) => {
                return Err(CoordinatorError::SecureAggregation(format!(
                    "round {} is not securely aggregated: a masked update cannot be used",
                    self.round
                )));
            }
            _ => {}
        }
        if self.reports.iter().any(|r| r.site == site) {
            return Err(CoordinatorError::AlreadyReported {
                site: site.to_string(),
                round: self.round,
            });
        }
        if self.refused.contains(site) {
            return Err(CoordinatorError::RefusedThisRound {
                site: site.to_string(),
                round: self.round,
            });
        }
        Ok(())
    }

    /// Whether `site` has nothing more to send this round (reported, or refused).
    fn done_with(&self, site: &str) -> bool {
        self.refused.contains(site) || self.reports.iter().any(|r| r.site == site)
    }

    /// Hands `site` the round's task if it may have it: not done with the round, and, under
    /// secure aggregation, while keys are taken. The round then waits for its update.
    pub fn hand_task(&mut self, site: &str) -> bool {
        if self.done_with(site) || self.secure.as_ref().is_some_and(|s| !s.takes(site)) {
            return false;
        }
        self.participants.insert(site.to_string());
        true
    }

    /// Folds a checked update (plain rounds) into the aggregate; [`Round::record`] follows.
    pub fn add_update(&mut self, update: &Weights, samples: u64) {
        self.aggregator
            .as_mut()
            .expect("admits refuses plain updates in secure rounds")
            .add(update, samples);
    }

    /// Cross-site evaluation: keeps the model `site`'s update makes, in the run's last round.
    pub fn keep_local_model(&mut self, site: &str, update: &Weights) {
        if let Some(models) = &mut self.local_models
            && let Ok(local) = self.base.plus(update)
        {
            models.insert(site.to_string(), local);
        }
    }

    /// The sites' local models kept for cross-site evaluation, by site.
    pub fn local_models(&self) -> impl Iterator<Item = (&String, &Weights)> {
        self.local_models.iter().flatten()
    }

    /// Records `site`'s report, as its update's `header` gives it (the update is in the
    /// aggregate or the masked sum); returns the number of reports so far.
    pub fn record(&mut self, site: &str, header: &UpdateHeader) -> usize {
        self.participants.insert(site.to_string());
        self.reports.push(Report {
            site: site.to_string(),
            samples: header.num_samples,
            metrics: header.metrics,
            train_seconds: header.train_seconds,
            bytes: header.total_bytes,
        });
        self.reports.len()
    }

    /// Leaves `site` out of the round: its update was refused; it is neither asked again nor
    /// waited for.
    pub fn refuse(&mut self, site: &str) {
        self.refused.insert(site.to_string());
    }

    /// Whether a round in the clear may close at `now`: at least `min_sites` reports, and
    /// either every site that took the task is done or the deadline has passed. (A secure
    /// round closes when its protocol completes: see [`SecureRound::advance`].)
    pub fn ready(&self, now: Instant, min_sites: usize) -> bool {
        let everyone = self.participants.iter().all(|p| self.done_with(p));
        self.reports.len() >= min_sites
            && (everyone || now >= self.deadline)
            && self.retry_at.is_none_or(|at| now >= at)
    }

    /// Closing the round at `now` could not write it: it is tried again after the returned
    /// wait (1 s, doubling, at most [`MAX_WRITE_RETRY`]).
    pub fn write_failed(&mut self, now: Instant) -> Duration {
        let wait = Duration::from_secs(1u64 << self.write_failures.min(5)).min(MAX_WRITE_RETRY);
        self.write_failures += 1;
        self.retry_at = Some(now + wait);
        wait
    }

    /// What the round's updates add up to: base + the aggregate of the updates (or of the
    /// unmasked sum). `dp`: the run is differentially private. This is the slow part of
    /// closing a round (a median's sort, a secure round's unmasking).
    ///
    /// An outcome that is not finite (its model or its metrics) is an error: every update was
    /// checked, but DP noise or a secure round's unmasked sum is not checked until here, and no
    /// such model may be written or handed out.
    pub fn aggregate(&self, dp: bool) -> Result<Outcome, CoordinatorError> {
        let refuse = |reason: String| CoordinatorError::Aggregation {
            round: self.round,
            reason,
        };
        let outcome = self.outcome(dp).map_err(|e| refuse(e.to_string()))?;
        outcome
            .weights
            .check_finite()
            .map_err(|e| refuse(format!("the aggregate is not finite: {e}")))?;
        if !outcome.metrics.loss.is_finite() || !outcome.metrics.dice.is_finite() {
            return Err(refuse(format!(
                "the mean metrics are not finite (loss {}, dice {})",
                outcome.metrics.loss, outcome.metrics.dice
            )));
        }
        Ok(outcome)
    }

    fn outcome(&self, dp: bool) -> Result<Outcome, CoordinatorError> {
        let mut sites: Vec<String> = self.reports.iter().map(|r| r.site.clone()).collect();
        sites.sort();
        let Some(secure) = &self.secure else {
            let aggregator = self.aggregator.as_ref().expect("a round in the clear");
            let weights = aggregator.finish(&self.base, &mut rand::rng());
            let samples: u64 = self.reports.iter().map(|r| r.samples).sum();
            let mean = |f: fn(&Metrics) -> f64| {
                self.reports
                    .iter()
                    .map(|r| f(&r.metrics) * r.samples as f64)
                    .sum::<f64>()
                    / samples.max(1) as f64
            };
            let metrics = Metrics {
                loss: mean(|m| m.loss),
                dice: mean(|m| m.dice),
            };
            let mut site_reports: Vec<SiteReport> = self
                .reports
                .iter()
                .map(|r| SiteReport {
                    site: r.site.clone(),
                    samples: r.samples,
                    loss: r.metrics.loss,
                    dice: r.metrics.dice,
                    train_seconds: r.train_seconds,
                    bytes: r.bytes,
                })
                .collect();
            site_reports.sort_by(|a, b| a.site.cmp(&b.site));
            return Ok(Outcome {
                weights,
                samples,
                metrics,
                sites,
                site_reports,
            });
        };
        let sum = secure.unmask()?;
        if sum.weight == 0 {
            return Err(CoordinatorError::SecureAggregation(
                "the unmasked weights add up to zero".into(),
            ));
        }
        let total = sum.weight as f64;
        let weights = crate::aggregate::shifted(&self.base, sum.values.iter().map(|s| s / total));
        let metrics = Metrics {
            loss: sum.weighted_metrics.loss / total,
            dice: sum.weighted_metrics.dice / total,
        };
        Ok(Outcome {
            weights,
            // Under DP every site weighs 1: the sample count stays with the sites.
            samples: if dp { 0 } else { sum.weight },
            metrics,
            sites,
            site_reports: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alveolus_proto::domain::{AggregationConfig, TrainingConfig};
    use alveolus_proto::weights::Tensor;

    fn config(deadline_seconds: u32) -> RunConfig {
        RunConfig {
            rounds: 3,
            min_sites: 2,
            deadline_seconds,
            training: TrainingConfig::default(),
            aggregation: AggregationConfig::default(),
            privacy: None,
            secure_aggregation: None,
            schedule: None,
            server_optimizer: None,
            validate_at_sites: false,
            cross_site_evaluation: false,
        }
    }

    fn model(value: f32) -> Weights {
        let mut weights = Weights::default();
        weights.tensors.insert(
            "w".into(),
            Tensor {
                shape: vec![2],
                values: vec![value; 2],
            },
        );
        weights
    }

    fn header(round: &Round, site_round: u32) -> UpdateHeader {
        UpdateHeader {
            run_id: round.run_id.clone(),
            round: site_round,
            base_version: round.base_version.clone(),
            num_samples: 1,
            metrics: Metrics::default(),
            total_bytes: 0,
            masked: false,
            train_seconds: None,
        }
    }

    fn round_at(now: Instant) -> Round {
        Round::open("run-1", &config(60), 1, "v0".into(), model(0.0), now)
    }

    fn report(round: &mut Round, site: &str, value: f32, samples: u64) {
        round.admits(site, &header(round, 1)).unwrap();
        round.add_update(&model(value), samples);
        round.record(
            site,
            &UpdateHeader {
                num_samples: samples,
                metrics: Metrics {
                    loss: value.into(),
                    dice: 0.5,
                },
                train_seconds: Some(f64::from(value) * 10.0),
                total_bytes: 100 * samples,
                ..header(round, 1)
            },
        );
    }

    #[test]
    fn a_round_closes_at_its_quorum_once_everyone_who_took_it_reported() {
        let now = Instant::now();
        let mut round = round_at(now);
        for site in ["a", "b", "c"] {
            assert!(round.hand_task(site));
        }
        report(&mut round, "a", 1.0, 1);
        assert!(!round.ready(now, 2), "one report is below the quorum");
        report(&mut round, "b", 3.0, 3);
        assert!(!round.ready(now, 2), "c took the task and is waited for");
        report(&mut round, "c", 1.0, 0);
        assert!(round.ready(now, 2));
        let outcome = round.aggregate(false).unwrap();
        // FedAvg weighted by samples: (1·1 + 3·3 + 0·1) / 4.
        assert_eq!(outcome.weights.tensors["w"].values, vec![2.5; 2]);
        assert_eq!(outcome.samples, 4);
        assert_eq!(outcome.sites, vec!["a", "b", "c"]);
        assert!((outcome.metrics.loss - 2.5).abs() < 1e-12);
        // Each site's own figures, as its header gave them, by site.
        let b = &outcome.site_reports[1];
        assert_eq!(outcome.site_reports.len(), 3);
        assert_eq!(
            (b.site.as_str(), b.samples, b.loss, b.train_seconds, b.bytes),
            ("b", 3, 3.0, Some(30.0), 300)
        );
    }

    #[test]
    fn a_round_that_did_not_write_is_tried_again_later_and_later() {
        let now = Instant::now();
        let mut round = round_at(now);
        round.hand_task("a");
        report(&mut round, "a", 1.0, 1);
        assert!(round.ready(now, 1));
        let waits: Vec<u64> = (0..8).map(|_| round.write_failed(now).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(!round.ready(now + Duration::from_secs(29), 1));
        assert!(round.ready(now + Duration::from_secs(30), 1));
    }

    #[test]
    fn a_dropped_site_holds_the_round_only_until_its_deadline() {
        let now = Instant::now();
        let mut round = round_at(now);
        for site in ["a", "b", "gone"] {
            round.hand_task(site);
        }
        report(&mut round, "a", 1.0, 1);
        report(&mut round, "b", 1.0, 1);
        assert!(!round.ready(now + Duration::from_secs(59), 2));
        assert!(round.ready(now + Duration::from_secs(60), 2));
        // Past the deadline, still not below the quorum.
        let mut lonely = round_at(now);
        lonely.hand_task("a");
        report(&mut lonely, "a", 1.0, 1);
        assert!(!lonely.ready(now + Duration::from_secs(600), 2));
    }

    #[test]
    fn a_refused_site_is_not_waited_for_nor_asked_again() {
        let now = Instant::now();
        let mut round = round_at(now);
        for site in ["a", "b", "bad"] {
            round.hand_task(site);
        }
        report(&mut round, "a", 1.0, 1);
        report(&mut round, "b", 1.0, 1);
        round.refuse("bad");
        assert!(round.ready(now, 2));
        assert!(!round.hand_task("bad"), "not handed the task again");
        assert!(matches!(
            round.admits("bad", &header(&round, 1)),
            Err(CoordinatorError::RefusedThisRound { .. })
        ));
    }

    #[test]
    fn updates_for_another_round_base_or_kind_and_repeats_are_refused() {
        let mut round = round_at(Instant::now());
        round.hand_task("a");
        report(&mut round, "a", 1.0, 1);
        let h = header(&round, 1);
        assert!(matches!(
            round.admits("a", &h),
            Err(CoordinatorError::AlreadyReported { .. })
        ));
        assert!(matches!(
            round.admits("b", &header(&round, 2)),
            Err(CoordinatorError::WrongRound {
                got: 2,
                expected: 1
            })
        ));
        let stale = UpdateHeader {
            base_version: "older".into(),
            ..h.clone()
        };
        assert!(matches!(
            round.admits("b", &stale),
            Err(CoordinatorError::WrongBase { .. })
        ));
        let masked = UpdateHeader { masked: true, ..h };
        assert!(matches!(
            round.admits("b", &masked),
            Err(CoordinatorError::SecureAggregation(_))
        ));
    }

    #[test]
    fn a_round_whose_model_would_not_be_finite_makes_none() {
        let now = Instant::now();
        let mut round = Round::open("run-1", &config(60), 1, "v0".into(), model(3e38), now);
        // Each update is finite; the model they make is not (the engine refuses such updates
        // one by one; this is the last check, for what no single update shows).
        report(&mut round, "a", 3e38, 1);
        report(&mut round, "b", 3e38, 1);
        let refused = round.aggregate(false).map(|_| ()).unwrap_err();
        assert!(
            matches!(&refused, CoordinatorError::Aggregation { round: 1, reason }
                if reason.contains("not finite")),
            "{refused}"
        );
    }
}
