//! The coordinator's round engine: it owns the state, hands out tasks, takes updates, moves
//! rounds on and announces. The rules live elsewhere: what a round admits and when it may close
//! in [`crate::round`], what a run's record becomes in [`crate::run`].
//!
//! Locking. `state` is a std `Mutex` because nothing awaits while holding it: it is held for
//! in-memory work only (at most folding one update into the aggregate). Every change that writes
//! the run log or the site list takes `writer`, a tokio `Mutex`, first, so that those writes land
//! in the order their changes were made; it is held across the writes, never the state lock.
//! The slow part of closing a round (aggregation, encoding, fsync) runs on a blocking thread
//! while the round is `Closing`: no task is handed out and no update taken meanwhile.
//!
//! Durability. A round's checkpoint, manifest and run-log entry are fsynced before the next
//! round opens and anyone is told, so a restarted coordinator resumes at the last finished
//! round and loses nothing finished.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use alveolus_proto::domain::{RunEvent, RunInfo, RunState, SiteInfo, SiteValidation};
use alveolus_proto::weights::Weights;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::{Semaphore, watch};

use crate::clock::{self, Instant, unix_ms};
use crate::config::CoordinatorSettings;
use crate::error::CoordinatorError;
use crate::limits::PerIdentity;
use crate::metrics::Metrics;
use crate::round::Round;
use crate::run::{self, RunRecord};
use crate::secure::Progress;
use crate::store::{Manifest, Store};

/// What the engine needs of the coordinator's settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub project: String,
    pub state_dir: PathBuf,
    /// Update buffers that may exist at once (memory O(model), not O(model x sites)).
    pub upload_slots: usize,
    pub max_model_bytes: u64,
    /// Longest a long-poll is held; twice it is how recently a site must have been heard from
    /// to count as live.
    pub max_long_poll: Duration,
}

impl From<&CoordinatorSettings> for EngineSettings {
    fn from(s: &CoordinatorSettings) -> Self {
        Self {
            project: s.project.clone(),
            state_dir: s.state_dir.clone(),
            upload_slots: s.upload_slots,
            max_model_bytes: s.max_model_bytes,
            max_long_poll: s.max_long_poll,
        }
    }
}

/// Where the current run's rounds are.
enum Phase {
    /// No round: no run in progress.
    Idle,
    Open(Box<Round>),
    /// The round is being aggregated and written (or its run ended): no task is handed out and
    /// no update taken until the next round opens.
    Closing {
        run_id: String,
        round: u32,
    },
    /// The run has had its last round (`round`) and waits, until `deadline`, for the sites of
    /// that round to report their validation of its final model (and, with cross-site
    /// evaluation, of each site's local model); no task but those evaluations is handed out.
    Validating {
        run_id: String,
        round: u32,
        deadline: Instant,
        /// (site, model version) still to report.
        awaiting: BTreeSet<(String, String)>,
    },
}

struct State {
    runs: Vec<RunRecord>,
    phase: Phase,
    sites: BTreeMap<String, SiteInfo>,
    /// When each site was last heard from, on the engine's clock: who is live.
    seen: BTreeMap<String, Instant>,
}

impl State {
    fn run_index(&self, run_id: &str) -> Result<usize, CoordinatorError> {
        if run_id.is_empty() {
            return self
                .runs
                .len()
                .checked_sub(1)
                .ok_or_else(|| CoordinatorError::UnknownRun("(no run has been started)".into()));
        }
        self.runs
            .iter()
            .position(|r| r.info.run_id == run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_string()))
    }

    fn open_round(&self) -> Result<&Round, CoordinatorError> {
        match &self.phase {
            Phase::Open(round) => Ok(round),
            Phase::Closing { round, .. } => Err(CoordinatorError::RoundClosing { round: *round }),
            Phase::Idle | Phase::Validating { .. } => Err(CoordinatorError::NoActiveRun),
        }
    }

    fn open_round_mut(&mut self) -> Result<&mut Round, CoordinatorError> {
        match &mut self.phase {
            Phase::Open(round) => Ok(round),
            Phase::Closing { round, .. } => Err(CoordinatorError::RoundClosing { round: *round }),
            Phase::Idle | Phase::Validating { .. } => Err(CoordinatorError::NoActiveRun),
        }
    }

    /// The run the phase belongs to, if any.
    fn current_run(&self) -> Option<&str> {
        match &self.phase {
            Phase::Open(round) => Some(&round.run_id),
            Phase::Closing { run_id, .. } | Phase::Validating { run_id, .. } => Some(run_id),
            Phase::Idle => None,
        }
    }

    /// Run `index` has had its last round: it waits for its sites' validation of the final
    /// model, for at most the run's round deadline from `now`.
    fn await_validation(&mut self, index: usize, now: Instant) {
        let info = &self.runs[index].info;
        let Some(last) = info.rounds.last() else {
            return;
        };
        let models = run::models_to_measure(info);
        let awaiting = last
            .sites
            .iter()
            .flat_map(|site| models.iter().map(move |(_, version)| (site, version)))
            .filter(|(site, version)| !run::reported(info, site, version))
            .map(|(site, version)| (site.clone(), version.clone()))
            .collect();
        self.phase = Phase::Validating {
            run_id: info.run_id.clone(),
            round: last.round,
            deadline: now + Duration::from_secs(info.config.deadline_seconds.into()),
            awaiting,
        };
    }

    /// Sites heard from within `window` of `now`: those connected, which will ask for the task.
    fn live(&self, now: Instant, window: Duration) -> BTreeSet<String> {
        self.seen
            .iter()
            .filter(|(_, seen)| now.saturating_duration_since(**seen) <= window)
            .map(|(site, _)| site.clone())
            .collect()
    }

    fn touch(&mut self, site: &str) {
        let entry = self
            .sites
            .entry(site.to_string())
            .or_insert_with(|| SiteInfo {
                name: site.to_string(),
                last_contact_unix_ms: 0,
                contributions: Vec::new(),
                certificate_expires_unix: None,
            });
        entry.last_contact_unix_ms = unix_ms();
        self.seen.insert(site.to_string(), clock::now());
    }

    /// Opens round `rounds.len() + 1` of run `index` from model `version` (`base`).
    fn open_next_round(&mut self, index: usize, version: String, base: Weights) {
        let run = &mut self.runs[index];
        let round = run.info.rounds.len() as u32 + 1;
        run.round_opened(round, &version);
        let info = &run.info;
        self.phase = Phase::Open(Box::new(Round::open(
            &info.run_id,
            &info.config,
            round,
            version,
            base,
            clock::now(),
        )));
    }
}

/// What an update or a tick did to the open round.
enum Settled {
    Unchanged,
    /// Something changed that waiters may want to see.
    Changed,
    /// The round can close: it is now `Closing`, and here it is.
    Close {
        round: Box<Round>,
        index: usize,
    },
    /// The round cannot finish (secure aggregation below its threshold): the run fails.
    Fail {
        index: usize,
        reason: String,
    },
    /// The sites have validated the run's final model, or stopped being waited for: the run
    /// completes.
    Complete {
        index: usize,
    },
}

pub struct Coordinator {
    project: String,
    store: Store,
    state: Mutex<State>,
    /// Serialises the changes that write the run log or the site list (see the module doc).
    writer: tokio::sync::Mutex<()>,
    /// Bumped on every change; long-polls and watchers wait on it.
    changed: watch::Sender<u64>,
    /// Bounds how many update buffers exist at once (memory O(model), not O(model x sites)).
    upload_slots: Arc<Semaphore>,
    /// Sites with an update streaming in: one each, so that one site cannot take every slot.
    uploading: PerIdentity,
    max_model_bytes: u64,
    max_long_poll: Duration,
    /// Counted as things happen, for the operator's Prometheus (see [`crate::metrics`]).
    metrics: Metrics,
}

impl Coordinator {
    /// Opens the state folder and resumes a run that was in progress.
    pub fn open(settings: impl Into<EngineSettings>) -> Result<Arc<Self>, CoordinatorError> {
        let settings = settings.into();
        let store = Store::open(&settings.state_dir)?;
        let mut state = State {
            runs: store
                .load_runs()?
                .into_iter()
                .map(RunRecord::restored)
                .collect(),
            phase: Phase::Idle,
            sites: store
                .load_sites()?
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
            seen: BTreeMap::new(),
        };
        let running: Vec<usize> = (0..state.runs.len())
            .filter(|&i| state.runs[i].is_running())
            .collect();
        // Only the newest running run can be resumed; older ones were left behind by a crash
        // during a start and are closed as aborted.
        if let Some((&last, older)) = running.split_last() {
            for &i in older {
                let info = run::ended(&state.runs[i].info, RunState::Aborted, None);
                store.put_run(&info)?;
                state.runs[i].ended(info);
            }
            let info = state.runs[last].info.clone();
            match store.resume_point(&info) {
                Some((resumed, bytes)) => {
                    if resumed.rounds.len() < info.rounds.len() {
                        tracing::warn!(
                            run = %info.run_id,
                            "going back to round {}: the checkpoints after it do not read",
                            resumed.rounds.len()
                        );
                        store.put_run(&resumed)?;
                        state.runs[last] = RunRecord::restored(resumed.clone());
                    }
                    tracing::info!(
                        run = %resumed.run_id,
                        finished_rounds = resumed.rounds.len(),
                        "resuming run at round {}",
                        resumed.rounds.len() + 1
                    );
                    if run::rounds_done(&resumed) {
                        // Stopped while the sites validated the final model: they are asked
                        // again, for a full deadline.
                        state.await_validation(last, clock::now());
                    } else {
                        let version = resumed.latest_version().to_string();
                        state.open_next_round(last, version, Weights::decode(&bytes)?);
                    }
                }
                None => {
                    let reason = "no checkpoint of the run reads, not even its initial model";
                    tracing::error!(run = %info.run_id, "{reason}");
                    let info = run::ended(&info, RunState::Failed, Some(reason.into()));
                    store.put_run(&info)?;
                    state.runs[last].ended(info);
                }
            }
        }
        Ok(Arc::new(Self {
            project: settings.project,
            store,
            state: Mutex::new(state),
            writer: tokio::sync::Mutex::new(()),
            changed: watch::Sender::new(0),
            upload_slots: Arc::new(Semaphore::new(settings.upload_slots)),
            uploading: PerIdentity::new("uploads", 1),
            max_model_bytes: settings.max_model_bytes,
            max_long_poll: settings.max_long_poll,
            metrics: Metrics::default(),
        }))
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    pub fn max_model_bytes(&self) -> u64 {
        self.max_model_bytes
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The engine's phase (`idle`, `open` or `closing`) and the run and round it is in.
    pub fn phase(&self) -> (&'static str, Option<(String, u32)>) {
        match &self.lock().phase {
            Phase::Idle => ("idle", None),
            Phase::Open(round) => ("open", Some((round.run_id.clone(), round.round))),
            Phase::Closing { run_id, round } => ("closing", Some((run_id.clone(), *round))),
            Phase::Validating { run_id, round, .. } => {
                ("validating", Some((run_id.clone(), *round)))
            }
        }
    }

    /// Sites heard from within two long-polls.
    pub fn live_sites(&self) -> BTreeSet<String> {
        self.lock().live(clock::now(), 2 * self.max_long_poll)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("coordinator state lock poisoned")
    }

    fn announce(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Moves the open round on at the deadline; called by the coordinator's timer.
    pub fn tick(self: &Arc<Self>) {
        self.settle(self.lock(), false);
    }

    /// After a change to the open round (`changed`), or a tick: moves its secure phases on,
    /// and starts closing it (or failing its run) when it can no longer wait. Announces what
    /// changed once the lock is released.
    fn settle(self: &Arc<Self>, mut state: MutexGuard<'_, State>, changed: bool) {
        let settled = self.step(&mut state, clock::now());
        drop(state);
        match settled {
            Settled::Unchanged if !changed => {}
            Settled::Unchanged | Settled::Changed => self.announce(),
            Settled::Close { round, index } => {
                let this = self.clone();
                tokio::spawn(async move { this.close_round(round, index).await });
            }
            Settled::Fail { index, reason } => {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.end_run(index, RunState::Failed, Some(reason)).await {
                        tracing::error!("cannot record the failed run: {e}");
                    }
                });
            }
            Settled::Complete { index } => {
                let this = self.clone();
                tokio::spawn(async move { this.complete_run(index).await });
            }
        }
    }

    /// The decision part of [`Coordinator::settle`], under the lock.
    fn step(&self, state: &mut State, now: Instant) -> Settled {
        if let Phase::Validating {
            run_id,
            round,
            deadline,
            awaiting,
        } = &state.phase
        {
            if !awaiting.is_empty() && now < *deadline {
                return Settled::Unchanged;
            }
            let Ok(index) = state.run_index(run_id) else {
                return Settled::Unchanged;
            };
            if !awaiting.is_empty() {
                tracing::warn!(run = %run_id, round, ?awaiting, "completing the run without these sites' validation: the deadline passed");
            }
            let (run_id, round) = (run_id.clone(), *round);
            state.phase = Phase::Closing { run_id, round };
            return Settled::Complete { index };
        }
        let Phase::Open(open) = &state.phase else {
            return Settled::Unchanged;
        };
        let Ok(index) = state.run_index(&open.run_id) else {
            return Settled::Unchanged;
        };
        let min_sites = state.runs[index].info.config.min_sites as usize;
        let (run_id, round) = (open.run_id.clone(), open.round);
        if let Some(secure) = &open.secure {
            // Only the key phase waits for the sites that are live: those heard from within
            // two long-polls are connected and will ask for the task.
            let live: BTreeSet<String> = if secure.collecting_keys() {
                state.live(now, 2 * self.max_long_poll)
            } else {
                BTreeSet::new()
            };
            let Phase::Open(open) = &mut state.phase else {
                unreachable!("matched above")
            };
            let deadline = open.deadline;
            let secure = open.secure.as_mut().expect("matched above");
            match secure.advance(now, deadline, min_sites, &live) {
                Progress::Unchanged => return Settled::Unchanged,
                Progress::Advanced => return Settled::Changed,
                Progress::Complete => {}
                Progress::Failed(reason) => {
                    tracing::warn!(round, "secure aggregation failed: {reason}");
                    state.phase = Phase::Closing { run_id, round };
                    return Settled::Fail {
                        index,
                        reason: format!("round {round} failed: {reason}"),
                    };
                }
            }
        } else if !open.ready(now, min_sites) {
            return Settled::Unchanged;
        }
        match std::mem::replace(&mut state.phase, Phase::Closing { run_id, round }) {
            Phase::Open(round) => Settled::Close { round, index },
            _ => unreachable!("matched above"),
        }
    }

    pub fn run(&self, run_id: &str) -> Result<RunInfo, CoordinatorError> {
        let state = self.lock();
        Ok(state.runs[state.run_index(run_id)?].info.clone())
    }

    pub fn runs(&self) -> Vec<RunInfo> {
        self.lock().runs.iter().map(|r| r.info.clone()).collect()
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

    /// What the sites of `manifest`'s run measured of its model on their validation cases, as
    /// the run's record has it now: empty for a model no site has measured.
    pub fn validations_of(&self, manifest: &Manifest) -> Vec<SiteValidation> {
        let state = self.lock();
        state
            .runs
            .iter()
            .find(|r| r.info.run_id == manifest.run_id)
            .map(|r| run::validations_of(&r.info, &manifest.sha256))
            .unwrap_or_default()
    }

    fn events_since(&self, run_id: &str, from: usize) -> (Vec<RunEvent>, bool) {
        let state = self.lock();
        match state.runs.iter().find(|r| r.info.run_id == run_id) {
            Some(run) => run.events_since(from),
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

mod sites;
mod uploads;
mod validation;
mod writes;

pub use uploads::{UPLOAD_TIMEOUT, Upload};

#[cfg(test)]
mod tests;
