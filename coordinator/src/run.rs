//! A run as the coordinator keeps it: its record (what the run log holds), the events its
//! watchers replay, and the run-level rules: what a finished round makes of the record (the
//! last round, the privacy budget), the norm an update may have, the task's secure part.

use std::collections::BTreeSet;

use alveolus_proto::domain::{
    CrossSiteValidation, DomainError, EvaluateTask, RoundSummary, RunConfig, RunEvent, RunInfo,
    RunState, SecureTask, SiteValidation,
};

use crate::error::CoordinatorError;

/// A run: its record and every event so far.
pub struct RunRecord {
    pub info: RunInfo,
    /// Everything `watch` replays: a watcher that attaches late still sees the whole run.
    pub events: Vec<RunEvent>,
    /// Evaluate tasks handed out, as (model version, site): each is handed once, so that a
    /// site whose evaluation fails is not asked again and again instead of training.
    evaluations_handed: BTreeSet<(String, String)>,
}

impl RunRecord {
    /// A run read back from the run log: its events rebuilt from its rounds.
    pub fn restored(info: RunInfo) -> Self {
        let mut events = Vec::new();
        let mut version = info.initial_version.clone();
        for summary in &info.rounds {
            events.push(RunEvent::RoundStarted {
                round: summary.round,
                model_version: version.clone(),
            });
            events.push(RunEvent::RoundFinished(summary.clone()));
            events.extend(summary.validation.iter().map(|v| RunEvent::SiteValidated {
                round: summary.round,
                validation: v.clone(),
                model_of: None,
            }));
            version = summary.version.clone();
        }
        let last = info.rounds.last().map_or(0, |r| r.round);
        events.extend(info.cross_site.iter().map(|c| RunEvent::SiteValidated {
            round: last,
            validation: c.validation.clone(),
            model_of: Some(c.model_of.clone()),
        }));
        if info.state != RunState::Running {
            events.push(RunEvent::RunFinished(Box::new(info.clone())));
        }
        Self {
            info,
            events,
            evaluations_handed: BTreeSet::new(),
        }
    }

    pub fn started(info: RunInfo) -> Self {
        Self {
            info,
            events: Vec::new(),
            evaluations_handed: BTreeSet::new(),
        }
    }

    /// The next evaluation `site` owes, if the run validates at the sites: the run's newest
    /// model, then (cross-site evaluation, after the last round) each site's local model;
    /// each handed once. Marks it handed.
    pub fn evaluation_for(&mut self, site: &str) -> Option<EvaluateTask> {
        if !self.info.config.validate_at_sites {
            return None;
        }
        let last = self.info.rounds.last()?;
        let owed = models_to_measure(&self.info)
            .into_iter()
            .filter(|(_, version)| !reported(&self.info, site, version))
            .find(|(_, version)| {
                self.evaluations_handed
                    .insert((version.clone(), site.to_string()))
            })?;
        let (model_of, model_version) = owed;
        Some(EvaluateTask {
            run_id: self.info.run_id.clone(),
            round: last.round,
            model_version,
            site_normalisation: self.info.config.training.site_normalisation,
            model_of,
        })
    }

    /// Checks a validation report before it is written: the run validates, `version` is a
    /// model of round `round` it asks the sites to measure, and `site` has not reported on it.
    pub fn check_validation(
        &self,
        site: &str,
        round: u32,
        version: &str,
    ) -> Result<(), CoordinatorError> {
        let refuse = |reason| CoordinatorError::ValidationRefused {
            run: self.info.run_id.clone(),
            round,
            reason,
        };
        if !self.is_running() {
            return Err(refuse("the run has ended"));
        }
        if !self.info.config.validate_at_sites {
            return Err(refuse("the run does not validate at the sites"));
        }
        let summary = self
            .info
            .rounds
            .iter()
            .find(|s| s.round == round)
            .ok_or_else(|| refuse("no such finished round"))?;
        let local = self.info.rounds.last().is_some_and(|l| l.round == round)
            && self.info.local_models.iter().any(|m| m.version == version);
        if summary.version != version && !local {
            return Err(refuse("the round made no such model"));
        }
        if reported(&self.info, site, version) {
            return Err(CoordinatorError::AlreadyReported {
                site: site.to_string(),
                round,
            });
        }
        Ok(())
    }

    /// A checked validation of model `version` of round `round` (already durable).
    pub fn validated(&mut self, round: u32, version: &str, validation: SiteValidation) {
        let model_of = add_validation(&mut self.info, round, version, validation.clone());
        self.events.push(RunEvent::SiteValidated {
            round,
            validation,
            model_of,
        });
    }

    pub fn is_running(&self) -> bool {
        self.info.state == RunState::Running
    }

    /// Round `round` opened from `version`.
    pub fn round_opened(&mut self, round: u32, version: &str) {
        self.info.reported.clear();
        self.events.push(RunEvent::RoundStarted {
            round,
            model_version: version.to_string(),
        });
    }

    pub fn update_accepted(&mut self, round: u32, site: &str) {
        self.info.reported.push(site.to_string());
        self.events.push(RunEvent::UpdateAccepted {
            round,
            site: site.to_string(),
        });
    }

    /// The record is now `info` (already durable), after `finished` closed a round.
    pub fn round_finished(&mut self, info: RunInfo, finished: RoundSummary) {
        self.info = info;
        self.events.push(RunEvent::RoundFinished(finished));
        if !self.is_running() {
            self.events
                .push(RunEvent::RunFinished(Box::new(self.info.clone())));
        }
    }

    /// The run ended (aborted, failed) with record `info` (already durable).
    pub fn ended(&mut self, info: RunInfo) {
        self.info = info;
        self.events
            .push(RunEvent::RunFinished(Box::new(self.info.clone())));
    }

    /// Events from the `from`th on, and whether the run has ended.
    pub fn events_since(&self, from: usize) -> (Vec<RunEvent>, bool) {
        (
            self.events.get(from..).unwrap_or_default().to_vec(),
            !self.is_running(),
        )
    }
}

/// The models the sites measure after the run's newest round, as (whose local model, version):
/// the round's global model, then (cross-site evaluation) each site's local model. A local
/// model that is the global model itself (a run of one site) is measured once, as the global.
pub fn models_to_measure(info: &RunInfo) -> Vec<(Option<String>, String)> {
    let Some(last) = info.rounds.last() else {
        return Vec::new();
    };
    let mut models = vec![(None, last.version.clone())];
    models.extend(
        info.local_models
            .iter()
            .filter(|m| m.version != last.version)
            .map(|m| (Some(m.site.clone()), m.version.clone())),
    );
    models
}

/// Whether `site` has reported on model `version` of the run.
pub fn reported(info: &RunInfo, site: &str, version: &str) -> bool {
    info.rounds
        .iter()
        .any(|r| r.version == version && r.validation.iter().any(|v| v.site == site))
        || info
            .cross_site
            .iter()
            .any(|c| c.model_version == version && c.validation.site == site)
}

/// Every site's validation of model `version` in the run's record: of a round's global model,
/// or (cross-site evaluation) of a site's local model.
pub fn validations_of(info: &RunInfo, version: &str) -> Vec<SiteValidation> {
    let global = info
        .rounds
        .iter()
        .filter(|r| r.version == version)
        .flat_map(|r| r.validation.iter().cloned());
    let local = info
        .cross_site
        .iter()
        .filter(|c| c.model_version == version)
        .map(|c| c.validation.clone());
    global.chain(local).collect()
}

/// Adds a checked validation of model `version` of round `round` to the run's record: to the
/// round's if it is its global model, to the cross-site ones if it is a site's local model
/// (whose site it returns).
pub fn add_validation(
    info: &mut RunInfo,
    round: u32,
    version: &str,
    validation: SiteValidation,
) -> Option<String> {
    if let Some(summary) = info
        .rounds
        .iter_mut()
        .find(|s| s.round == round && s.version == version)
    {
        summary.validation.push(validation);
        return None;
    }
    let owner = info
        .local_models
        .iter()
        .find(|m| m.version == version)?
        .site
        .clone();
    info.cross_site.push(CrossSiteValidation {
        model_of: owner.clone(),
        model_version: version.to_string(),
        validation,
    });
    Some(owner)
}

/// Whether the run has had its last round: its rounds are done, or its budget stopped it.
pub fn rounds_done(info: &RunInfo) -> bool {
    info.rounds.len() as u32 >= info.config.rounds || info.stop_reason.is_some()
}

/// The record of `info`'s run after round `summary`: the round appended, and the run completed
/// when it was the last round or the next would take ε past the budget, unless the sites are
/// still to validate its final model (the run then completes with [`completed`]).
pub fn after_round(info: &RunInfo, summary: RoundSummary) -> RunInfo {
    let mut info = info.clone();
    let round = summary.round;
    info.rounds.push(summary);
    info.reported.clear();
    info.held_up = None;
    let mut done = info.rounds.len() as u32 >= info.config.rounds;
    if !done
        && let Some(privacy) = &info.config.privacy
        && let Some(budget) = privacy.epsilon_budget
    {
        let next = alveolus_privacy::run_epsilon(privacy, round + 1);
        if next > budget {
            info.stop_reason = Some(format!(
                "privacy budget: round {} would spend epsilon {next:.4} > {budget}",
                round + 1
            ));
            done = true;
        }
    }
    if done && !info.config.validate_at_sites {
        info.state = RunState::Completed;
    }
    info
}

/// `info`'s run completed, after the sites validated its final model.
pub fn completed(info: &RunInfo) -> RunInfo {
    let mut info = info.clone();
    info.state = RunState::Completed;
    info.reported.clear();
    info.held_up = None;
    info
}

/// `info` ended as `end` (aborted, failed), with `reason` for its status.
pub fn ended(info: &RunInfo, end: RunState, reason: Option<String>) -> RunInfo {
    let mut info = info.clone();
    info.state = end;
    info.reported.clear();
    info.held_up = None;
    if reason.is_some() {
        info.stop_reason = reason;
    }
    info
}

/// ε after `rounds` rounds of a run, if it is differentially private.
pub fn epsilon_after(config: &RunConfig, rounds: u32) -> Option<f64> {
    config
        .privacy
        .as_ref()
        .map(|p| alveolus_privacy::run_epsilon(p, rounds))
}

/// Checks a run's settings before it starts: valid, and its first round within its budget.
pub fn check_start(config: &RunConfig) -> Result<(), CoordinatorError> {
    config.validate()?;
    if let Some(p) = &config.privacy
        && let Some(budget) = p.epsilon_budget
    {
        let first = alveolus_privacy::run_epsilon(p, 1);
        if first > budget {
            return Err(CoordinatorError::Domain(DomainError::Invalid {
                field: "epsilon_budget",
                reason: format!(
                    "one round already spends epsilon {first:.4} > {budget}; raise the noise or the budget"
                ),
            }));
        }
    }
    Ok(())
}

/// The largest update norm a run accepts: its DP clip norm (agents clip; a larger update
/// means an agent that does not, and would void the guarantee) or its norm bound.
pub fn norm_limit(config: &RunConfig) -> Option<f64> {
    let clip = config
        .privacy
        .as_ref()
        // Agents clip in f32; leave room for its rounding.
        .map(|p| p.clip_norm * (1.0 + 1e-4));
    match (clip, config.aggregation.norm_bound) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The secure-aggregation part of a run's train tasks: the threshold, and each site's share
/// of the DP noise.
pub fn secure_task(config: &RunConfig) -> Option<SecureTask> {
    let secure = config.secure_aggregation?;
    Some(SecureTask {
        threshold: secure.threshold,
        noise_std: config.privacy.as_ref().map(|p| {
            alveolus_privacy::dp::noise_share_std(p.noise_multiplier, p.clip_norm, secure.threshold)
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alveolus_proto::domain::{PrivacyConfig, TrainingConfig};

    fn info(rounds: u32, privacy: Option<PrivacyConfig>) -> RunInfo {
        RunInfo {
            run_id: "run-1".into(),
            state: RunState::Running,
            config: RunConfig {
                rounds,
                min_sites: 1,
                deadline_seconds: 60,
                training: TrainingConfig::default(),
                privacy,
                aggregation: Default::default(),
                secure_aggregation: None,
                schedule: None,
                server_optimizer: None,
                validate_at_sites: false,
                cross_site_evaluation: false,
            },
            initial_version: "v0".into(),
            rounds: Vec::new(),
            reported: vec!["a".into()],
            started_unix_ms: 0,
            stop_reason: None,
            held_up: None,
            local_models: Vec::new(),
            cross_site: Vec::new(),
        }
    }

    fn summary(round: u32) -> RoundSummary {
        RoundSummary {
            round,
            version: format!("v{round}"),
            sites: vec!["a".into()],
            samples: 1,
            loss: 0.5,
            dice: 0.5,
            finished_unix_ms: 0,
            epsilon: None,
            validation: Vec::new(),
            site_reports: Vec::new(),
        }
    }

    /// A model's validations are the round's when it is a global model, the cross-site ones
    /// when it is a site's local model; `add_validation` files each where it belongs.
    #[test]
    fn a_models_validations_are_found_where_they_were_filed() {
        use alveolus_proto::domain::{LocalModel, SiteValidation, Validation};
        let at = |site: &str, cases: u32| SiteValidation {
            site: site.into(),
            validation: Validation {
                cases,
                infection_dice: None,
                classes: Vec::new(),
            },
        };
        let mut run = after_round(&info(2, None), summary(1));
        run.local_models.push(LocalModel {
            site: "a".into(),
            version: "local-a".into(),
        });
        assert_eq!(add_validation(&mut run, 1, "v1", at("a", 2)), None);
        assert_eq!(add_validation(&mut run, 1, "v1", at("b", 3)), None);
        assert_eq!(
            add_validation(&mut run, 1, "local-a", at("b", 3)),
            Some("a".into())
        );
        assert_eq!(validations_of(&run, "v1"), [at("a", 2), at("b", 3)]);
        assert_eq!(validations_of(&run, "local-a"), [at("b", 3)]);
        assert!(validations_of(&run, "v0").is_empty());
    }

    #[test]
    fn the_last_round_completes_the_run_and_a_restart_replays_its_events() {
        let first = after_round(&info(2, None), summary(1));
        assert_eq!(first.state, RunState::Running);
        assert!(first.reported.is_empty());
        let second = after_round(&first, summary(2));
        assert_eq!(second.state, RunState::Completed);
        let restored = RunRecord::restored(second);
        assert_eq!(
            restored.events.len(),
            5,
            "two rounds started and finished, one end"
        );
        assert!(matches!(
            &restored.events[2],
            RunEvent::RoundStarted { round: 2, model_version } if model_version == "v1"
        ));
        let (events, ended) = restored.events_since(4);
        assert!(ended && matches!(events[..], [RunEvent::RunFinished(_)]));
    }

    #[test]
    fn a_round_that_would_break_the_privacy_budget_is_not_started() {
        let privacy = PrivacyConfig {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            epsilon_budget: Some(0.0),
        };
        let budget = alveolus_privacy::run_epsilon(&privacy, 2);
        let privacy = PrivacyConfig {
            epsilon_budget: Some(budget * 0.999),
            ..privacy
        };
        let config = info(10, Some(privacy.clone())).config;
        check_start(&config).unwrap();
        let next = after_round(&info(10, Some(privacy)), summary(1));
        assert_eq!(next.state, RunState::Completed);
        assert!(
            next.stop_reason
                .unwrap()
                .contains("round 2 would spend epsilon")
        );
    }
}
