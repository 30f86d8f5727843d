//! What sites ask of the engine: joining, tasks (long-polled), secure-aggregation steps, and
//! updates, checked before any data and again before they touch the aggregate.

use std::sync::Arc;
use std::time::Duration;

use alveolus_privacy::wire::{Reply, Request, Step};
use alveolus_proto::domain::{Task, TrainTask, TrainingConfig, UpdateHeader};
use alveolus_proto::weights::Weights;

use super::{Coordinator, Phase, State};
use crate::clock;
use crate::error::CoordinatorError;
use crate::run;

impl Coordinator {
    /// `site` joined with a certificate that expires at `certificate_expires` (Unix seconds).
    pub fn join(&self, site: &str, certificate_expires: Option<i64>) {
        let mut state = self.lock();
        state.touch(site);
        if let Some(entry) = state.sites.get_mut(site) {
            entry.certificate_expires_unix = certificate_expires.or(entry.certificate_expires_unix);
        }
        drop(state);
        self.announce();
    }

    pub(super) fn try_task(&self, site: &str) -> Option<Task> {
        let mut state = self.lock();
        state.touch(site);
        let State { phase, runs, .. } = &mut *state;
        // A finished round's model is measured before the next one is trained from it: the
        // evaluation is short, and the run's last one holds up its completion.
        let current = match phase {
            Phase::Open(open) => Some(open.run_id.as_str()),
            Phase::Validating { run_id, .. } => Some(run_id.as_str()),
            Phase::Idle | Phase::Closing { .. } => None,
        }?;
        if let Some(task) = runs
            .iter_mut()
            .find(|r| r.info.run_id == current)
            .and_then(|r| r.evaluation_for(site))
        {
            return Some(Task::Evaluate(task));
        }
        let Phase::Open(open) = phase else {
            return None;
        };
        if !open.hand_task(site) {
            return None;
        }
        let config = &runs
            .iter()
            .find(|r| r.info.run_id == open.run_id)?
            .info
            .config;
        Some(Task::Train(TrainTask {
            run_id: open.run_id.clone(),
            round: open.round,
            model_version: open.base_version.clone(),
            training: TrainingConfig {
                learning_rate: config.learning_rate(open.round),
                ..config.training.clone()
            },
            clip_norm: config.privacy.as_ref().map(|p| p.clip_norm),
            secure_aggregation: run::secure_task(config),
        }))
    }

    /// Waits (up to the long-poll limit) for `ready` to give an answer, re-checking on every
    /// change; None when the wait ran out.
    pub(super) async fn wait_until<T>(
        &self,
        wait: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let until = clock::now() + wait.min(self.max_long_poll);
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
        self: &Arc<Self>,
        site: &str,
        request: Request,
    ) -> Result<Reply, CoordinatorError> {
        let secure_round = |state: &State| -> Result<(), CoordinatorError> {
            let open = state.open_round()?;
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
            state.touch(site);
            secure_round(&state)?;
            let secure = state
                .open_round_mut()?
                .secure
                .as_mut()
                .expect("checked above");
            match &request.step {
                Step::Keys(keys) => secure.add_keys(site, *keys)?,
                Step::Shares(message) => secure.add_shares(site, message.clone())?,
                Step::AwaitSurvivors => {}
                Step::Reveal(shares) => secure.add_reveal(site, shares.clone())?,
            }
            self.settle(state, false);
        }
        if matches!(request.step, Step::Reveal(_)) {
            return Ok(Reply::Revealed);
        }
        let answer = || -> Option<Result<Reply, CoordinatorError>> {
            let state = self.lock();
            if let Err(e) = secure_round(&state) {
                return match e {
                    // Closing: the answer comes with the next round (as a wrong-round error).
                    CoordinatorError::RoundClosing { .. } => None,
                    e => Some(Err(e)),
                };
            }
            let secure = state.open_round().ok()?.secure.as_ref()?;
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
        let open = state.open_round()?;
        open.admits(site, header)?;
        Ok(open.base.clone())
    }

    /// Bytes a masked update for the round in progress must have.
    pub fn masked_bytes(&self, site: &str, header: &UpdateHeader) -> Result<u64, CoordinatorError> {
        let state = self.lock();
        let open = state.open_round()?;
        open.admits(site, header)?;
        let secure = open.secure.as_ref().expect("admits checked it is secure");
        secure.admits_masked(site)?;
        Ok(secure.masked_bytes())
    }

    /// Adds a masked update (secure aggregation) to the round's masked sum.
    pub fn accept_masked_update(
        self: &Arc<Self>,
        site: &str,
        header: &UpdateHeader,
        bytes: &[u8],
    ) -> Result<usize, CoordinatorError> {
        let mut state = self.lock();
        let index = state.run_index(&header.run_id)?;
        let open = state.open_round_mut()?;
        open.admits(site, header)?;
        let secure = open.secure.as_mut().expect("admits checked it is secure");
        secure.add_masked(site, bytes)?;
        // The sample count and metrics are inside the masked sum.
        let reports = open.record(site, header);
        let round = open.round;
        state.runs[index].update_accepted(round, site);
        self.settle(state, true);
        Ok(reports)
    }

    /// Folds a complete, verified update into the round. Layout and finiteness are checked
    /// here again so that nothing unchecked reaches the aggregate.
    pub fn accept_update(
        self: &Arc<Self>,
        site: &str,
        header: &UpdateHeader,
        update: &Weights,
    ) -> Result<usize, CoordinatorError> {
        let base = self.check_update(site, header)?;
        base.check_same_layout(update)?;
        update.check_finite()?;
        // Updates that are well formed but unusable: the site is left out of this round, as a
        // site whose update was refused, so that the round does not wait for it.
        let overflow = update.check_finite_on(&base).err();
        let norm = alveolus_privacy::dp::l2_norm(update);
        let mut state = self.lock();
        // The round may have closed while the data streamed in: check again under the lock.
        let index = state.run_index(&header.run_id)?;
        let limit = run::norm_limit(&state.runs[index].info.config);
        let open = state.open_round_mut()?;
        open.admits(site, header)?;
        let round = open.round;
        let unusable = match (overflow, limit) {
            (Some(e), _) => Some(CoordinatorError::from(e)),
            (None, Some(bound)) if norm > bound => Some(CoordinatorError::UpdateNorm {
                site: site.to_string(),
                norm,
                bound,
            }),
            _ => None,
        };
        if let Some(e) = unusable {
            open.refuse(site);
            self.settle(state, true);
            return Err(e);
        }
        open.add_update(update, header.num_samples);
        open.keep_local_model(site, update);
        let reports = open.record(site, header);
        tracing::info!(%site, round, samples = header.num_samples, "update accepted");
        state.runs[index].update_accepted(round, site);
        self.settle(state, true);
        Ok(reports)
    }
}
