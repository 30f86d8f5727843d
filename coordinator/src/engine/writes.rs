//! The engine's changes that write the run log: closing a round (aggregate, checkpoint, run
//! log, then the next round), ending a run, starting one. Each holds the writer lock across its
//! writes, does them on a blocking thread, and changes the state only once they are durable.

use std::sync::Arc;

use alveolus_proto::domain::{
    LocalModel, Metrics, RoundSummary, RunConfig, RunInfo, RunState, ServerOptimizer, SiteInfo,
    Strategy,
};
use alveolus_proto::weights::{MODEL_METADATA_KEY, Weights};
use bytes::Bytes;

use super::{Coordinator, Phase, State};
use crate::clock::unix_ms;
use crate::error::CoordinatorError;
use crate::round::{Outcome, Round};
use crate::run::{self, RunRecord};
use crate::server_opt::{self, Moments};
use crate::store::{Manifest, Store};

impl Coordinator {
    /// Aggregates and writes a round that stopped taking updates, then opens the next round
    /// (or completes the run) and announces. If a write fails, the round is reopened and the
    /// next tick tries again: nothing was announced.
    pub(super) async fn close_round(self: Arc<Self>, round: Box<Round>, index: usize) {
        let _writer = self.writer.lock().await;
        let (id, number) = (round.run_id.clone(), round.round);
        let closing = |state: &State| {
            state.runs[index].is_running()
                && matches!(&state.phase, Phase::Closing { run_id, round }
                    if *run_id == id && *round == number)
        };
        if !closing(&self.lock()) {
            // The run ended (aborted) before its round could be closed.
            return;
        }
        match self.finish_round(round, index).await {
            Ok(()) => self.announce(),
            Err(Unfinished::Write(e, mut round)) => {
                let wait = round.write_failed(crate::clock::now());
                let held_up = format!(
                    "round {number} is aggregated but cannot be saved, retrying in {} s: {e}",
                    wait.as_secs()
                );
                tracing::error!(run = %id, "{held_up}");
                let mut state = self.lock();
                if closing(&state) {
                    state.runs[index].info.held_up = Some(held_up);
                    state.phase = Phase::Open(round);
                }
            }
            Err(Unfinished::Aggregate(e, base)) => {
                // No retry can change what the round received: the run ends here, and its
                // latest model stays the one the round started from.
                tracing::error!(round = number, "{e}");
                drop(_writer);
                let reason = format!("{e}; the run keeps model {base}");
                if let Err(e) = self.end_run(index, RunState::Failed, Some(reason)).await {
                    tracing::error!("cannot record the failed run: {e}");
                }
            }
        }
    }

    pub(super) async fn finish_round(
        &self,
        round: Box<Round>,
        index: usize,
    ) -> Result<(), Unfinished> {
        let info = self.lock().runs[index].info.clone();
        let config = info.config.clone();
        let store = self.store.clone();
        // Off the async workers: the aggregate, its encoding, the checkpoint's fsync.
        let writing = std::time::Instant::now();
        let (round, written) = blocking(move || {
            let written = aggregate_and_store(&store, &config, &round);
            (round, written)
        })
        .await;
        let checkpoint_took = writing.elapsed();
        let (outcome, manifest, local_models) = match written {
            Ok(written) => written,
            Err(e @ CoordinatorError::Aggregation { .. }) => {
                return Err(Unfinished::Aggregate(e, round.base_version.clone()));
            }
            Err(e) => return Err(Unfinished::Write(e, round)),
        };
        let summary = RoundSummary {
            round: round.round,
            version: manifest.sha256.clone(),
            sites: outcome.sites.clone(),
            samples: outcome.samples,
            loss: outcome.metrics.loss,
            dice: outcome.metrics.dice,
            finished_unix_ms: manifest.created_unix_ms,
            epsilon: manifest.epsilon,
            site_reports: outcome.site_reports.clone(),
            validation: Vec::new(),
        };
        let mut next = run::after_round(&info, summary.clone());
        next.local_models.extend(local_models);
        let sites = {
            let mut sites = self.lock().sites.clone();
            for site in &outcome.sites {
                if let Some(entry) = sites.get_mut(site) {
                    match entry
                        .contributions
                        .iter_mut()
                        .find(|(run, _)| *run == round.run_id)
                    {
                        Some((_, rounds)) => rounds.push(round.round),
                        None => entry
                            .contributions
                            .push((round.run_id.clone(), vec![round.round])),
                    }
                }
            }
            sites
        };
        let store = self.store.clone();
        let record = next.clone();
        let site_list: Vec<SiteInfo> = sites.values().cloned().collect();
        // Durable before announced: the run log now points at the fsynced checkpoint.
        if let Err(e) = blocking(move || {
            store.put_run(&record)?;
            if let Err(e) = store.put_sites(&site_list) {
                tracing::warn!("site list not saved: {e}");
            }
            Ok::<_, CoordinatorError>(())
        })
        .await
        {
            return Err(Unfinished::Write(e, round));
        }
        self.metrics.round_written(
            crate::clock::now().saturating_duration_since(round.opened),
            checkpoint_took,
        );
        tracing::info!(
            run = %round.run_id,
            round = round.round,
            sites = outcome.sites.len(),
            samples = outcome.samples,
            loss = outcome.metrics.loss,
            version = %summary.version,
            "round finished"
        );
        let mut state = self.lock();
        for (name, site) in sites {
            // Contacts and joins made while the round closed are newer than the copy.
            let now = state.sites.get(&name);
            let contact = now.map(|s| s.last_contact_unix_ms);
            let expires = now.and_then(|s| s.certificate_expires_unix);
            state.sites.insert(
                name,
                SiteInfo {
                    last_contact_unix_ms: contact.unwrap_or(site.last_contact_unix_ms),
                    certificate_expires_unix: expires.or(site.certificate_expires_unix),
                    ..site
                },
            );
        }
        state.runs[index].round_finished(next, summary.clone());
        if state.runs[index].is_running() && run::rounds_done(&state.runs[index].info) {
            tracing::info!(run = %round.run_id, "last round done; waiting for the sites' validation of the final model");
            state.await_validation(index, crate::clock::now());
        } else if state.runs[index].is_running() {
            state.open_next_round(index, summary.version, outcome.weights);
        } else {
            tracing::info!(run = %round.run_id, "run completed");
            state.phase = Phase::Idle;
        }
        Ok(())
    }

    /// Ends run `index` as `end` (aborted, failed), durably, with `reason` for its status, and
    /// drops its round.
    pub(super) async fn end_run(
        &self,
        index: usize,
        end: RunState,
        reason: Option<String>,
    ) -> Result<RunInfo, CoordinatorError> {
        let _writer = self.writer.lock().await;
        let info = {
            let state = self.lock();
            let run = &state.runs[index];
            if !run.is_running() {
                return Ok(run.info.clone());
            }
            run::ended(&run.info, end, reason)
        };
        let store = self.store.clone();
        let record = info.clone();
        blocking(move || store.put_run(&record)).await?;
        let mut state = self.lock();
        if state.current_run() == Some(info.run_id.as_str()) {
            state.phase = Phase::Idle;
        }
        state.runs[index].ended(info.clone());
        drop(state);
        self.announce();
        Ok(info)
    }

    /// Starts a run from an initial model (already digest-checked safetensors bytes).
    pub async fn start_run(
        &self,
        config: RunConfig,
        model: &Bytes,
    ) -> Result<RunInfo, CoordinatorError> {
        run::check_start(&config)?;
        let weights = Weights::decode(model)?;
        weights.check_finite()?;
        if weights.tensors.is_empty() {
            return Err(CoordinatorError::Stream(
                "the initial model has no tensors".into(),
            ));
        }
        // The network itself is the agents' to build; a file that does not describe one would
        // start a run no agent can take part in.
        let description = weights.metadata.get(MODEL_METADATA_KEY).ok_or_else(|| {
            CoordinatorError::Stream(format!(
                "the initial model does not describe its network (no `{MODEL_METADATA_KEY}` metadata); make it with `alveolus run start` or `alveolus train`"
            ))
        })?;
        if !serde_json::from_str::<serde_json::Value>(description).is_ok_and(|v| v.is_object()) {
            return Err(CoordinatorError::Stream(format!(
                "the initial model's `{MODEL_METADATA_KEY}` metadata is not a JSON object"
            )));
        }
        let _writer = self.writer.lock().await;
        let run_id = {
            let state = self.lock();
            if let Some(active) = state.runs.iter().find(|r| r.is_running()) {
                return Err(CoordinatorError::RunInProgress {
                    active: active.info.run_id.clone(),
                });
            }
            let mut run_id = format!("run-{}", unix_ms());
            while state.runs.iter().any(|r| r.info.run_id == run_id) {
                run_id.push('x');
            }
            run_id
        };
        let started = unix_ms();
        let store = self.store.clone();
        let model = model.clone();
        let info = blocking(move || {
            let manifest = store.put_model(
                &model,
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
                    strategy: Strategy::of(&config),
                    local_of: None,
                },
            )?;
            let info = RunInfo {
                run_id,
                state: RunState::Running,
                config,
                initial_version: manifest.sha256,
                rounds: Vec::new(),
                reported: Vec::new(),
                started_unix_ms: started,
                stop_reason: None,
                held_up: None,
                local_models: Vec::new(),
                cross_site: Vec::new(),
            };
            store.put_run(&info)?;
            Ok::<_, CoordinatorError>(info)
        })
        .await?;
        {
            let mut state = self.lock();
            state.runs.push(RunRecord::started(info.clone()));
            let index = state.runs.len() - 1;
            state.open_next_round(index, info.initial_version.clone(), weights);
        }
        tracing::info!(run = %info.run_id, rounds = info.config.rounds, "run started");
        self.announce();
        Ok(info)
    }

    pub async fn abort(&self, run_id: &str) -> Result<RunInfo, CoordinatorError> {
        let index = {
            let state = self.lock();
            state.run_index(run_id)?
        };
        let info = self.end_run(index, RunState::Aborted, None).await?;
        tracing::info!(run = %info.run_id, "run aborted");
        Ok(info)
    }
}

/// Why a round did not finish.
pub(super) enum Unfinished {
    /// A write failed: the round is reopened and closing it is tried again.
    Write(CoordinatorError, Box<Round>),
    /// The updates make no usable model (with the version the round started from).
    Aggregate(CoordinatorError, String),
}

/// The round's outcome, written as a checkpoint with its manifest (fsynced), and in the last
/// round of a run with cross-site evaluation the sites' local models.
fn aggregate_and_store(
    store: &Store,
    config: &RunConfig,
    round: &Round,
) -> Result<(Outcome, Manifest, Vec<LocalModel>), CoordinatorError> {
    let mut outcome = round.aggregate(config.privacy.is_some())?;
    if let Some(optimizer) = &config.server_optimizer {
        outcome.weights = optimized(store, optimizer, round, &outcome.weights)?;
    }
    let manifest = store.put_model(
        &outcome.weights.encode(),
        Manifest {
            sha256: String::new(),
            bytes: 0,
            run_id: round.run_id.clone(),
            round: round.round,
            parent: Some(round.base_version.clone()),
            sites: outcome.sites.clone(),
            samples: outcome.samples,
            metrics: Some(outcome.metrics),
            created_unix_ms: unix_ms(),
            aggregation: Some(config.aggregation),
            privacy: config.privacy.clone(),
            secure_aggregation: config.secure_aggregation,
            epsilon: run::epsilon_after(config, round.round),
            strategy: Strategy::of(config),
            local_of: None,
        },
    )?;
    let mut local_models = Vec::new();
    for (site, model) in round.local_models() {
        let report = outcome.site_reports.iter().find(|r| &r.site == site);
        let local = store.put_model(
            &model.encode(),
            Manifest {
                sites: vec![site.clone()],
                samples: report.map_or(0, |r| r.samples),
                metrics: report.map(|r| Metrics {
                    loss: r.loss,
                    dice: r.dice,
                }),
                local_of: Some(site.clone()),
                ..manifest.clone()
            },
        )?;
        local_models.push(LocalModel {
            site: site.clone(),
            version: local.sha256,
        });
    }
    Ok((outcome, manifest, local_models))
}

/// The server optimizer's step from the round's aggregate, its moments read from the round
/// before (fresh in round 1) and written for this one. Moments that do not read, or a step that
/// is not finite, fail the run like any aggregate that cannot be a model; a write that fails is
/// retried with the round.
fn optimized(
    store: &Store,
    optimizer: &ServerOptimizer,
    round: &Round,
    aggregate: &Weights,
) -> Result<Weights, CoordinatorError> {
    let refuse = |reason: String| CoordinatorError::Aggregation {
        round: round.round,
        reason,
    };
    let moments = if round.round <= 1 {
        Moments::initial(&round.base, optimizer)
    } else {
        let previous = round.round - 1;
        store
            .optimizer_state(&round.run_id, previous)
            .map_err(|e| e.to_string())
            .and_then(|bytes| Moments::decode(&bytes, &round.base))
            .map_err(|e| {
                refuse(format!(
                    "the server optimizer's state after round {previous} does not read: {e}"
                ))
            })?
    };
    let (next, moments) = server_opt::step(optimizer, &round.base, aggregate, moments);
    next.check_finite()
        .map_err(|e| refuse(format!("the server optimizer's step is not finite: {e}")))?;
    store.put_optimizer_state(&round.run_id, round.round, &moments.encode())?;
    Ok(next)
}

/// Runs `work` on a blocking thread (disk writes, big sums) and waits for it.
pub(super) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
