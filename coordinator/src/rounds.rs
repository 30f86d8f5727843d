//! Runs and rounds: who gets which task, which updates count, when a round closes, and what is
//! written before a new model is announced.
//!
//! A round closes when at least `min_sites` have reported and either every site that took the
//! round's task has reported or the round's deadline has passed. The new checkpoint and the run
//! log are fsynced before the next round is announced, so a restarted coordinator resumes at
//! the last finished round and loses nothing finished.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alveolus_privacy::secagg::RoundContext;
use alveolus_privacy::wire::{Reply, Request, Step};
use alveolus_proto::domain::{
    DomainError, Metrics, RoundSummary, RunConfig, RunEvent, RunInfo, RunState, SecureTask,
    SiteInfo, Task, TrainTask, UpdateHeader,
};
use alveolus_proto::weights::Weights;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::{Semaphore, watch};

use crate::aggregate::Aggregator;
use crate::config::CoordinatorSettings;
use crate::error::CoordinatorError;
use crate::secure::{Progress, SecureRound};
use crate::store::{Manifest, Store};

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

struct Report {
    site: String,
    samples: u64,
    metrics: Metrics,
}

/// The round in progress: its starting model and the running aggregate.
struct OpenRound {
    run_id: String,
    round: u32,
    base_version: String,
    base: Arc<Weights>,
    deadline: Instant,
    /// Sites handed this round's task; the round waits for all of them until the deadline.
    participants: BTreeSet<String>,
    reports: Vec<Report>,
    /// Sites whose update was refused for its norm: not asked again this round, not waited for.
    refused: BTreeSet<String>,
    /// Rounds in the clear only: a secure round's sum is in `secure`.
    aggregator: Option<Aggregator>,
    /// Present when the run uses secure aggregation: the masked sum and the protocol's phases.
    secure: Option<SecureRound>,
}

impl OpenRound {
    /// Whether a message about `run_id`'s round `round` is about this round.
    fn is_round(&self, run_id: &str, round: u32) -> Result<(), CoordinatorError> {
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
    fn admits(&self, site: &str, header: &UpdateHeader) -> Result<(), CoordinatorError> {
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

    fn done_with(&self, site: &str) -> bool {
        self.refused.contains(site) || self.reports.iter().any(|r| r.site == site)
    }
}

struct RunRecord {
    info: RunInfo,
    /// Everything `watch` replays: a watcher that attaches late still sees the whole run.
    events: Vec<RunEvent>,
}

struct State {
    runs: Vec<RunRecord>,
    round: Option<OpenRound>,
    sites: BTreeMap<String, SiteInfo>,
}

pub struct Coordinator {
    project: String,
    store: Store,
    state: Mutex<State>,
    /// Bumped on every change; long-polls and watchers wait on it.
    changed: watch::Sender<u64>,
    /// Bounds how many update buffers exist at once (memory O(model), not O(model x sites)).
    upload_slots: Arc<Semaphore>,
    max_model_bytes: u64,
    max_long_poll: Duration,
}

fn round_events(info: &RunInfo) -> Vec<RunEvent> {
    let mut events = Vec::new();
    let mut version = info.initial_version.clone();
    for summary in &info.rounds {
        events.push(RunEvent::RoundStarted {
            round: summary.round,
            model_version: version.clone(),
        });
        events.push(RunEvent::RoundFinished(summary.clone()));
        version = summary.version.clone();
    }
    events
}

impl Coordinator {
    /// Opens the state folder and resumes a run that was in progress.
    pub fn open(settings: &CoordinatorSettings) -> Result<Arc<Self>, CoordinatorError> {
        let store = Store::open(&settings.state_dir)?;
        let mut state = State {
            runs: Vec::new(),
            round: None,
            sites: store
                .load_sites()?
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
        };
        for info in store.load_runs()? {
            let mut events = round_events(&info);
            if info.state != RunState::Running {
                events.push(RunEvent::RunFinished(info.clone()));
            }
            state.runs.push(RunRecord { info, events });
        }
        let coordinator = Self {
            project: settings.project.clone(),
            store,
            state: Mutex::new(state),
            changed: watch::Sender::new(0),
            upload_slots: Arc::new(Semaphore::new(settings.upload_slots)),
            max_model_bytes: settings.max_model_bytes,
            max_long_poll: settings.max_long_poll,
        };
        {
            let mut state = coordinator.lock();
            let running: Vec<usize> = (0..state.runs.len())
                .filter(|&i| state.runs[i].info.state == RunState::Running)
                .collect();
            // Only the newest running run can be resumed; older ones were left behind by a crash
            // during a start and are closed as aborted.
            if let Some((&last, older)) = running.split_last() {
                for &i in older {
                    state.runs[i].info.state = RunState::Aborted;
                    coordinator.store.put_run(&state.runs[i].info)?;
                }
                let info = state.runs[last].info.clone();
                tracing::info!(
                    run = %info.run_id,
                    finished_rounds = info.rounds.len(),
                    "resuming run at round {}",
                    info.rounds.len() + 1
                );
                let version = info.latest_version().to_string();
                let (bytes, _) = coordinator.store.get_model(&version)?;
                Self::open_round(&mut state, last, version, Weights::decode(&bytes)?);
            }
        }
        Ok(Arc::new(coordinator))
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    pub fn max_model_bytes(&self) -> u64 {
        self.max_model_bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("coordinator state lock poisoned")
    }

    fn announce(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Starts round `rounds.len() + 1` of run `index` from model `version` (`base`).
    fn open_round(state: &mut State, index: usize, version: String, base: Weights) {
        let run = &mut state.runs[index];
        let round = run.info.rounds.len() as u32 + 1;
        run.events.push(RunEvent::RoundStarted {
            round,
            model_version: version.clone(),
        });
        run.info.reported.clear();
        let config = &run.info.config;
        let deadline = Duration::from_secs(config.deadline_seconds.into());
        let secure = config.secure_aggregation.map(|s| {
            let context = RoundContext {
                run_id: run.info.run_id.clone(),
                round,
            };
            SecureRound::new(context, s.threshold, base.num_values(), deadline)
        });
        state.round = Some(OpenRound {
            run_id: run.info.run_id.clone(),
            round,
            base_version: version,
            deadline: Instant::now() + deadline,
            participants: BTreeSet::new(),
            reports: Vec::new(),
            refused: BTreeSet::new(),
            aggregator: secure
                .is_none()
                .then(|| Aggregator::new(&base, config.aggregation.rule, config.privacy.as_ref())),
            secure,
            base: Arc::new(base),
        });
    }

    fn run_index(state: &State, run_id: &str) -> Result<usize, CoordinatorError> {
        if run_id.is_empty() {
            return state
                .runs
                .len()
                .checked_sub(1)
                .ok_or_else(|| CoordinatorError::UnknownRun("(no run has been started)".into()));
        }
        state
            .runs
            .iter()
            .position(|r| r.info.run_id == run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_string()))
    }

    fn touch(state: &mut State, site: &str) {
        let entry = state
            .sites
            .entry(site.to_string())
            .or_insert_with(|| SiteInfo {
                name: site.to_string(),
                last_contact_unix_ms: 0,
                contributions: Vec::new(),
            });
        entry.last_contact_unix_ms = unix_ms();
    }

    pub fn join(&self, site: &str) {
        Self::touch(&mut self.lock(), site);
        self.announce();
    }

    fn try_task(&self, site: &str) -> Option<Task> {
        let mut state = self.lock();
        Self::touch(&mut state, site);
        let open = state.round.as_mut()?;
        if open.done_with(site) || open.secure.as_ref().is_some_and(|s| !s.takes(site)) {
            return None;
        }
        open.participants.insert(site.to_string());
        let (run_id, round, version) = (open.run_id.clone(), open.round, open.base_version.clone());
        let run = state.runs.iter().find(|r| r.info.run_id == run_id)?;
        Some(Task::Train(TrainTask {
            run_id,
            round,
            model_version: version,
            training: run.info.config.training.clone(),
            clip_norm: run.info.config.privacy.as_ref().map(|p| p.clip_norm),
            secure_aggregation: secure_task(&run.info.config),
        }))
    }

    /// Waits (up to the long-poll limit) for `ready` to give an answer, re-checking on every
    /// change; None when the wait ran out.
    async fn wait_until<T>(
        &self,
        wait: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let until = tokio::time::Instant::now() + wait.min(self.max_long_poll);
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(answer) = ready() {
                return Some(answer);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return None },
                _ = tokio::time::sleep_until(until) => return ready(),
            }
        }
    }

    /// The site's next task, waiting up to `wait` for one to appear.
    pub async fn next_task(&self, site: &str, wait: Duration) -> Task {
        self.wait_until(wait, || self.try_task(site))
            .await
            .unwrap_or(Task::Wait { retry_after_ms: 0 })
    }

    /// One step of a securely aggregated round: takes the site's submission, then answers
    /// once the step's phase has closed (or Pending when `wait_seconds` ran out).
    pub async fn secure_step(
        &self,
        site: &str,
        request: Request,
    ) -> Result<Reply, CoordinatorError> {
        let round_of = |state: &mut State| -> Result<(), CoordinatorError> {
            let open = state.round.as_ref().ok_or(CoordinatorError::NoActiveRun)?;
            open.is_round(&request.run_id, request.round)?;
            if open.secure.is_none() {
                return Err(CoordinatorError::SecureAggregation(format!(
                    "round {} is not securely aggregated",
                    open.round
                )));
            }
            Ok(())
        };
        {
            let mut state = self.lock();
            Self::touch(&mut state, site);
            round_of(&mut state)?;
            let secure = state
                .round
                .as_mut()
                .and_then(|r| r.secure.as_mut())
                .expect("checked above");
            match &request.step {
                Step::Keys(keys) => secure.add_keys(site, *keys)?,
                Step::Shares(message) => secure.add_shares(site, message.clone())?,
                Step::AwaitSurvivors => {}
                Step::Reveal(shares) => secure.add_reveal(site, shares.clone())?,
            }
            let changed = self.close_if_ready(&mut state, Instant::now())?;
            drop(state);
            if changed {
                self.announce();
            }
        }
        if matches!(request.step, Step::Reveal(_)) {
            return Ok(Reply::Revealed);
        }
        let answer = || -> Option<Result<Reply, CoordinatorError>> {
            let mut state = self.lock();
            if let Err(e) = round_of(&mut state) {
                return Some(Err(e));
            }
            let secure = state.round.as_ref()?.secure.as_ref()?;
            Some(match &request.step {
                Step::Keys(_) => secure.roster_for(site)?.map(Reply::Roster),
                Step::Shares(_) => secure.inbox_for(site)?,
                Step::AwaitSurvivors => secure.survivors_for(site)?.map(Reply::Survivors),
                Step::Reveal(_) => Ok(Reply::Revealed),
            })
        };
        let wait = Duration::from_secs(request.wait_seconds.into());
        self.wait_until(wait, answer)
            .await
            .unwrap_or(Ok(Reply::Pending))
    }

    /// Checks an update's header against the round in progress before any data is received.
    /// Returns the base model the update must match.
    pub fn check_update(
        &self,
        site: &str,
        header: &UpdateHeader,
    ) -> Result<Arc<Weights>, CoordinatorError> {
        let state = self.lock();
        let open = state.round.as_ref().ok_or(CoordinatorError::NoActiveRun)?;
        open.admits(site, header)?;
        Ok(open.base.clone())
    }

    /// Bytes a masked update for the round in progress must have.
    pub fn masked_bytes(&self, site: &str, header: &UpdateHeader) -> Result<u64, CoordinatorError> {
        let state = self.lock();
        let open = state.round.as_ref().ok_or(CoordinatorError::NoActiveRun)?;
        open.admits(site, header)?;
        let secure = open.secure.as_ref().expect("admits checked it is secure");
        secure.admits_masked(site)?;
        Ok(secure.masked_bytes())
    }

    /// Adds a masked update (secure aggregation) to the round's masked sum.
    pub fn accept_masked_update(
        &self,
        site: &str,
        header: &UpdateHeader,
        bytes: &[u8],
    ) -> Result<usize, CoordinatorError> {
        let mut state = self.lock();
        let open = state.round.as_mut().ok_or(CoordinatorError::NoActiveRun)?;
        open.admits(site, header)?;
        let secure = open.secure.as_mut().expect("admits checked it is secure");
        secure.add_masked(site, bytes)?;
        let index = Self::run_index(&state, &header.run_id)?;
        // The sample count and metrics are inside the masked sum.
        self.record_report(state, index, site, 0, Metrics::default())
    }

    /// Records an update that went into the round's aggregate, and closes the round if that
    /// was the last one it waited for. Returns the number of reports so far.
    fn record_report(
        &self,
        mut state: MutexGuard<'_, State>,
        index: usize,
        site: &str,
        samples: u64,
        metrics: Metrics,
    ) -> Result<usize, CoordinatorError> {
        let open = state.round.as_mut().expect("the caller checked the round");
        open.participants.insert(site.to_string());
        open.reports.push(Report {
            site: site.to_string(),
            samples,
            metrics,
        });
        let (reports, round) = (open.reports.len(), open.round);
        let run = &mut state.runs[index];
        run.info.reported.push(site.to_string());
        run.events.push(RunEvent::UpdateAccepted {
            round,
            site: site.to_string(),
        });
        self.close_if_ready(&mut state, Instant::now())?;
        drop(state);
        self.announce();
        Ok(reports)
    }

    /// A permit to hold one update buffer; waits while all slots are taken.
    pub async fn upload_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.upload_slots
            .clone()
            .acquire_owned()
            .await
            .expect("the upload semaphore is never closed")
    }

    /// Folds a complete, verified update into the round. Layout and finiteness are checked
    /// here again so that nothing unchecked reaches the aggregate.
    pub fn accept_update(
        &self,
        site: &str,
        header: &UpdateHeader,
        update: &Weights,
    ) -> Result<usize, CoordinatorError> {
        let base = self.check_update(site, header)?;
        base.check_same_layout(update)?;
        update.check_finite()?;
        let norm = alveolus_privacy::dp::l2_norm(update);
        let mut state = self.lock();
        // The round may have closed while the data streamed in: check again under the lock.
        let open = state.round.as_mut().ok_or(CoordinatorError::NoActiveRun)?;
        open.admits(site, header)?;
        let index = Self::run_index(&state, &header.run_id)?;
        if let Some(bound) = Self::norm_limit(&state.runs[index].info.config)
            && norm > bound
        {
            let open = state.round.as_mut().expect("checked above");
            open.refused.insert(site.to_string());
            tracing::warn!(%site, round = open.round, norm, bound, "update refused for its norm");
            self.close_if_ready(&mut state, Instant::now())?;
            drop(state);
            self.announce();
            return Err(CoordinatorError::UpdateNorm {
                site: site.to_string(),
                norm,
                bound,
            });
        }
        let open = state.round.as_mut().expect("checked above");
        open.aggregator
            .as_mut()
            .expect("admits refuses plain updates in secure rounds")
            .add(update, header.num_samples);
        tracing::info!(%site, round = open.round, samples = header.num_samples, "update accepted");
        self.record_report(state, index, site, header.num_samples, header.metrics)
    }

    /// The largest update norm a run accepts: its DP clip norm (agents clip; a larger update
    /// means an agent that does not, and would void the guarantee) or its norm bound.
    fn norm_limit(config: &RunConfig) -> Option<f64> {
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

    /// Closes the round when its quorum is met; called on each update and by the deadline timer.
    pub fn tick(&self) -> Result<(), CoordinatorError> {
        let mut state = self.lock();
        let closed = self.close_if_ready(&mut state, Instant::now())?;
        drop(state);
        if closed {
            self.announce();
        }
        Ok(())
    }

    fn close_if_ready(&self, state: &mut State, now: Instant) -> Result<bool, CoordinatorError> {
        let Some(open) = state.round.as_ref() else {
            return Ok(false);
        };
        let index = Self::run_index(state, &open.run_id)?;
        let min_sites = state.runs[index].info.config.min_sites as usize;
        let round = open.round;
        let ready = if open.secure.is_some() {
            match self.advance_secure(state, now, min_sites) {
                Progress::Unchanged => return Ok(false),
                Progress::Advanced => return Ok(true),
                Progress::Complete => true,
                Progress::Failed(reason) => {
                    tracing::warn!(round, "secure aggregation failed: {reason}");
                    let reason = format!("round {round} failed: {reason}");
                    self.end_run(state, index, RunState::Failed, Some(reason))?;
                    return Ok(true);
                }
            }
        } else {
            let everyone = open.participants.iter().all(|p| open.done_with(p));
            open.reports.len() >= min_sites && (everyone || now >= open.deadline)
        };
        if !ready {
            return Ok(false);
        }
        let open = state.round.take().expect("checked above");
        if let Err(e) = self.finish_round(state, index, &open) {
            // Nothing was announced; keep collecting and retry on the next tick.
            state.round = Some(open);
            return Err(e);
        }
        Ok(true)
    }

    /// Moves the open secure round's phases on.
    fn advance_secure(&self, state: &mut State, now: Instant, min_sites: usize) -> Progress {
        let open = state.round.as_ref().expect("checked by the caller");
        let secure = open.secure.as_ref().expect("checked by the caller");
        // Only the key phase waits for the sites that are live: those heard from within two
        // long-polls are connected and will ask for the task.
        let live: BTreeSet<String> = if secure.collecting_keys() {
            let recent = unix_ms() - 2 * self.max_long_poll.as_millis() as i64;
            state
                .sites
                .values()
                .filter(|s| s.last_contact_unix_ms >= recent)
                .map(|s| s.name.clone())
                .collect()
        } else {
            BTreeSet::new()
        };
        let open = state.round.as_mut().expect("checked by the caller");
        let deadline = open.deadline;
        let secure = open.secure.as_mut().expect("checked by the caller");
        secure.advance(now, deadline, min_sites, &live)
    }

    /// Ends run `index` as `end` (aborted, failed), durably, with `reason` for its status, and
    /// drops its open round.
    fn end_run(
        &self,
        state: &mut State,
        index: usize,
        end: RunState,
        reason: Option<String>,
    ) -> Result<RunInfo, CoordinatorError> {
        let mut info = state.runs[index].info.clone();
        info.state = end;
        info.reported.clear();
        if reason.is_some() {
            info.stop_reason = reason;
        }
        self.store.put_run(&info)?;
        if state
            .round
            .as_ref()
            .is_some_and(|r| r.run_id == info.run_id)
        {
            state.round = None;
        }
        let run = &mut state.runs[index];
        run.info = info.clone();
        run.events.push(RunEvent::RunFinished(info.clone()));
        Ok(info)
    }

    /// The next model, the sample count and the mean metrics of a closed round.
    fn aggregate(
        &self,
        open: &OpenRound,
        dp: bool,
    ) -> Result<(Weights, u64, Metrics), CoordinatorError> {
        let Some(secure) = &open.secure else {
            let aggregator = open.aggregator.as_ref().expect("a round in the clear");
            let weights = aggregator.finish(&open.base, &mut rand::rng());
            let samples: u64 = open.reports.iter().map(|r| r.samples).sum();
            let mean = |f: fn(&Metrics) -> f64| {
                open.reports
                    .iter()
                    .map(|r| f(&r.metrics) * r.samples as f64)
                    .sum::<f64>()
                    / samples.max(1) as f64
            };
            let metrics = Metrics {
                loss: mean(|m| m.loss),
                dice: mean(|m| m.dice),
            };
            return Ok((weights, samples, metrics));
        };
        let sum = secure.unmask()?;
        if sum.weight == 0 {
            return Err(CoordinatorError::SecureAggregation(
                "the unmasked weights add up to zero".into(),
            ));
        }
        let total = sum.weight as f64;
        let weights = crate::aggregate::shifted(&open.base, sum.values.iter().map(|s| s / total));
        let metrics = Metrics {
            loss: sum.weighted_metrics.loss / total,
            dice: sum.weighted_metrics.dice / total,
        };
        // Under DP every site weighs 1: the sample count stays with the sites.
        Ok((weights, if dp { 0 } else { sum.weight }, metrics))
    }

    fn finish_round(
        &self,
        state: &mut State,
        index: usize,
        open: &OpenRound,
    ) -> Result<(), CoordinatorError> {
        let config = state.runs[index].info.config.clone();
        let privacy = config.privacy.as_ref();
        let (weights, samples, metrics) = self.aggregate(open, privacy.is_some())?;
        let epsilon_after = |rounds: u32| privacy.map(|p| alveolus_privacy::run_epsilon(p, rounds));
        let epsilon = epsilon_after(open.round);
        let mut sites: Vec<String> = open.reports.iter().map(|r| r.site.clone()).collect();
        sites.sort();
        let manifest = self.store.put_model(
            &weights.encode(),
            Manifest {
                sha256: String::new(),
                bytes: 0,
                run_id: open.run_id.clone(),
                round: open.round,
                parent: Some(open.base_version.clone()),
                sites: sites.clone(),
                samples,
                metrics: Some(metrics),
                created_unix_ms: unix_ms(),
                aggregation: Some(config.aggregation),
                privacy: config.privacy.clone(),
                secure_aggregation: config.secure_aggregation,
                epsilon,
            },
        )?;
        let summary = RoundSummary {
            round: open.round,
            version: manifest.sha256.clone(),
            sites: sites.clone(),
            samples,
            loss: metrics.loss,
            dice: metrics.dice,
            finished_unix_ms: manifest.created_unix_ms,
            epsilon,
        };
        let mut info = state.runs[index].info.clone();
        info.rounds.push(summary.clone());
        info.reported.clear();
        let mut done = info.rounds.len() as u32 >= info.config.rounds;
        if !done
            && let Some(budget) = privacy.and_then(|p| p.epsilon_budget)
            && let Some(next) = epsilon_after(open.round + 1)
            && next > budget
        {
            info.stop_reason = Some(format!(
                "privacy budget: round {} would spend epsilon {next:.4} > {budget}",
                open.round + 1
            ));
            done = true;
        }
        if done {
            info.state = RunState::Completed;
        }
        // Durable before announced: the run log now points at the fsynced checkpoint.
        self.store.put_run(&info)?;
        for site in &sites {
            if let Some(entry) = state.sites.get_mut(site) {
                match entry
                    .contributions
                    .iter_mut()
                    .find(|(run, _)| *run == open.run_id)
                {
                    Some((_, rounds)) => rounds.push(open.round),
                    None => entry
                        .contributions
                        .push((open.run_id.clone(), vec![open.round])),
                }
            }
        }
        let site_list: Vec<SiteInfo> = state.sites.values().cloned().collect();
        if let Err(e) = self.store.put_sites(&site_list) {
            tracing::warn!("site list not saved: {e}");
        }
        tracing::info!(
            run = %open.run_id,
            round = open.round,
            sites = sites.len(),
            samples,
            loss = metrics.loss,
            version = %summary.version,
            "round finished"
        );
        let run = &mut state.runs[index];
        run.info = info;
        run.events.push(RunEvent::RoundFinished(summary.clone()));
        if done {
            run.events.push(RunEvent::RunFinished(run.info.clone()));
            tracing::info!(run = %open.run_id, "run completed");
        } else {
            Self::open_round(state, index, summary.version, weights);
        }
        Ok(())
    }

    /// Starts a run from an initial model (already digest-checked safetensors bytes).
    pub fn start_run(&self, config: RunConfig, model: &Bytes) -> Result<RunInfo, CoordinatorError> {
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
        let weights = Weights::decode(model)?;
        weights.check_finite()?;
        if weights.tensors.is_empty() {
            return Err(CoordinatorError::Stream(
                "the initial model has no tensors".into(),
            ));
        }
        let mut state = self.lock();
        if let Some(active) = state
            .runs
            .iter()
            .find(|r| r.info.state == RunState::Running)
        {
            return Err(CoordinatorError::RunInProgress {
                active: active.info.run_id.clone(),
            });
        }
        let started = unix_ms();
        let mut run_id = format!("run-{started}");
        while state.runs.iter().any(|r| r.info.run_id == run_id) {
            run_id.push('x');
        }
        let manifest = self.store.put_model(
            model,
            Manifest {
                sha256: String::new(),
                bytes: 0,
                run_id: run_id.clone(),
                round: 0,
                parent: None,
                sites: Vec::new(),
                samples: 0,
                metrics: None,
                created_unix_ms: started,
                aggregation: Some(config.aggregation),
                privacy: config.privacy.clone(),
                secure_aggregation: config.secure_aggregation,
                epsilon: None,
            },
        )?;
        let info = RunInfo {
            run_id,
            state: RunState::Running,
            config,
            initial_version: manifest.sha256.clone(),
            rounds: Vec::new(),
            reported: Vec::new(),
            started_unix_ms: started,
            stop_reason: None,
        };
        self.store.put_run(&info)?;
        state.runs.push(RunRecord {
            info: info.clone(),
            events: Vec::new(),
        });
        let index = state.runs.len() - 1;
        Self::open_round(&mut state, index, manifest.sha256, weights);
        drop(state);
        tracing::info!(run = %info.run_id, rounds = info.config.rounds, "run started");
        self.announce();
        Ok(info)
    }

    pub fn run(&self, run_id: &str) -> Result<RunInfo, CoordinatorError> {
        let state = self.lock();
        Ok(state.runs[Self::run_index(&state, run_id)?].info.clone())
    }

    pub fn runs(&self) -> Vec<RunInfo> {
        self.lock().runs.iter().map(|r| r.info.clone()).collect()
    }

    pub fn abort(&self, run_id: &str) -> Result<RunInfo, CoordinatorError> {
        let mut state = self.lock();
        let index = Self::run_index(&state, run_id)?;
        if state.runs[index].info.state != RunState::Running {
            return Ok(state.runs[index].info.clone());
        }
        let info = self.end_run(&mut state, index, RunState::Aborted, None)?;
        drop(state);
        tracing::info!(run = %info.run_id, "run aborted");
        self.announce();
        Ok(info)
    }

    pub fn sites(&self) -> Vec<SiteInfo> {
        self.lock().sites.values().cloned().collect()
    }

    /// A checkpoint by version; empty means the newest model of the newest run.
    pub fn model(&self, version: &str) -> Result<(Bytes, Manifest), CoordinatorError> {
        let version = if version.is_empty() {
            let state = self.lock();
            let run = state.runs.last().ok_or_else(|| {
                CoordinatorError::UnknownVersion("(no run has been started)".into())
            })?;
            run.info.latest_version().to_string()
        } else {
            version.to_string()
        };
        self.store.get_model(&version)
    }

    fn events_since(&self, run_id: &str, from: usize) -> (Vec<RunEvent>, bool) {
        let state = self.lock();
        match state.runs.iter().find(|r| r.info.run_id == run_id) {
            Some(run) => (
                run.events.get(from..).unwrap_or_default().to_vec(),
                run.info.state != RunState::Running,
            ),
            None => (Vec::new(), true),
        }
    }

    /// The run's events from its start, then live ones, ending after the run ends.
    pub fn watch(
        self: &Arc<Self>,
        run_id: &str,
    ) -> Result<impl Stream<Item = RunEvent> + use<>, CoordinatorError> {
        let run_id = self.run(run_id)?.run_id;
        let changes = self.changed.subscribe();
        let start = (self.clone(), run_id, 0usize, changes);
        let batches =
            futures::stream::unfold(start, |(this, run_id, seen, mut changes)| async move {
                loop {
                    let (events, ended) = this.events_since(&run_id, seen);
                    if !events.is_empty() {
                        let seen = seen + events.len();
                        return Some((
                            futures::stream::iter(events),
                            (this, run_id, seen, changes),
                        ));
                    }
                    if ended || changes.changed().await.is_err() {
                        return None;
                    }
                }
            });
        Ok(futures::StreamExt::flatten(batches))
    }
}

/// The secure-aggregation part of a run's train tasks: the threshold, and each site's share
/// of the DP noise.
fn secure_task(config: &RunConfig) -> Option<SecureTask> {
    let secure = config.secure_aggregation?;
    Some(SecureTask {
        threshold: secure.threshold,
        noise_std: config.privacy.as_ref().map(|p| {
            alveolus_privacy::dp::noise_share_std(p.noise_multiplier, p.clip_norm, secure.threshold)
        }),
    })
}
