//! The agent's loop: join, long-poll, pull, train, push; reconnect with backoff when the
//! coordinator is away.
//!
//! What leaves the site: the protocol version and agent version at join, the update tensors
//! (local minus global weights, no metadata), the sample count and two aggregate numbers (loss,
//! Dice); under secure aggregation the same numbers, masked, plus the protocol's keys and
//! shares (`secure`); when the run validates at the sites, Dice per class of each round's
//! model on the site's validation cases and how many cases they are. Never a file name, a
//! slice, a mask or a header from the site's data.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alveolus_models::train::TrainError;
use alveolus_models::{DeviceChoice, ModelSpec, Precision, Progress};
use alveolus_proto::domain::{EvaluateTask, Task, TrainTask, UpdateHeader, ValidationReport};
use alveolus_proto::kit::ClientKit;
use alveolus_proto::weights::Weights;

use crate::error::AgentError;
use crate::kept;
use crate::local::{LocalUpdate, local_update, measure, no_validation};
use crate::metrics::AgentMetrics;
use crate::secure::SecureError;
use crate::site_data::SiteData;
use crate::site_norms::SiteNorms;
use crate::transport::{
    Federation, Traffic, Verdict, join, next_task, pull_model, push_update, report_validation,
    status_error, verdict,
};

/// How the agent behaves beyond its kit.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub device: DeviceChoice,
    /// The site's own precision, over the run's: the site knows what its hardware does well.
    pub precision: Option<Precision>,
    /// Where to keep a copy of every update sent (what left the site, byte for byte).
    pub audit_dir: Option<PathBuf>,
    /// FedBN: where to write this site's own model of each round, the global model with this
    /// site's normalisation layers, when the site measures it. The published global model has
    /// the run's initial ones, so this is the model to segment with here.
    pub site_models: Option<PathBuf>,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// How long one long-poll may be held by the coordinator.
    pub poll_seconds: u32,
    /// Counted whether or not anyone scrapes them; `alveolus agent --metrics` serves them.
    pub metrics: Arc<AgentMetrics>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            precision: None,
            audit_dir: None,
            site_models: None,
            max_backoff: Duration::from_secs(30),
            poll_seconds: 25,
            metrics: Arc::default(),
        }
    }
}

/// Runs until `shutdown` completes or the coordinator refuses this agent for good.
pub async fn run_agent(
    kit: ClientKit,
    data: SiteData,
    options: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let resolved = options.device.resolve()?;
    tracing::info!(site = %kit.identity.name, slices = data.slices().len(), "training on {resolved}");
    let mut agent = Agent {
        kit,
        data,
        options,
        resolved,
        prepared: None,
        site_norms: SiteNorms::default(),
    };
    tokio::select! {
        result = agent.run_forever() => result,
        _ = shutdown => {
            tracing::info!("agent stopping");
            Ok(())
        }
    }
}

struct Agent {
    kit: ClientKit,
    data: SiteData,
    options: AgentOptions,
    /// The backend and device training runs on, named in logs and cautions.
    resolved: alveolus_models::ResolvedDevice,
    /// Slices resized for the last model size seen, kept across rounds.
    prepared: Option<(usize, std::sync::Arc<Vec<alveolus_models::LabelledSlice>>)>,
    /// FedBN: this site's normalisation layers, trained in an earlier round of the run.
    site_norms: SiteNorms,
}

impl Agent {
    async fn run_forever(&mut self) -> Result<(), AgentError> {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.session(&mut backoff).await {
                Ok(()) => backoff = Duration::from_millis(500),
                // Refused with this certificate (revoked, say) while a renewed one waits in the
                // kit folder: the next session takes it.
                Err(AgentError::Refused(message)) if self.newer_kit().is_some() => {
                    tracing::warn!(
                        "the coordinator refused this certificate ({message}); the kit folder holds a new one: reconnecting with it"
                    );
                }
                Err(AgentError::Refused(message)) => return Err(AgentError::Refused(message)),
                Err(
                    e @ (AgentError::Train(_)
                    | AgentError::TrainingPanicked(_)
                    | AgentError::Device(_)
                    | AgentError::Audit { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    self.options.metrics.reconnecting();
                    tracing::warn!("{e}; reconnecting in {:.1}s", backoff.as_secs_f32());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
    }

    /// One connection's worth of work; returns on any transport error. A session that joined
    /// resets `backoff`: a coordinator that restarts after hours of rounds is rejoined in
    /// half a second, not after the wait earlier outages built up.
    async fn session(&mut self, backoff: &mut Duration) -> Result<(), AgentError> {
        self.reload_kit();
        let channel = self.kit.connect().await?;
        let mut client = Federation::new(channel);
        let joined = join(&mut client).await?;
        *backoff = Duration::from_millis(500);
        tracing::info!(site = %joined.site, project = %joined.project, "joined the coordinator");
        loop {
            let task = next_task(&mut client, self.options.poll_seconds).await?;
            match task {
                Task::Wait { retry_after_ms } => {
                    if retry_after_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(retry_after_ms.into())).await;
                    }
                }
                Task::Train(task) => self.train_round(&mut client, task).await?,
                Task::Evaluate(task) => self.evaluate(&mut client, task).await?,
            }
        }
    }

    /// Reads the kit folder again before each connection, so that a renewed certificate (copied
    /// over the old one, `alveolus renew`) is used from the next connection on without a
    /// restart: the connection that the revocation of the old certificate ends is the last with
    /// it. A kit that no longer reads, or names another identity, is reported and the one in use
    /// kept.
    fn reload_kit(&mut self) {
        if let Some(kit) = self.newer_kit() {
            let expires = kit
                .certificate_expires()
                .map(alveolus_proto::kit::utc)
                .unwrap_or_else(|e| e.to_string());
            tracing::info!(%expires, "kit reloaded: using its new certificate");
            self.kit = kit;
        }
    }

    /// The kit in the kit folder, when it reads, is this site's and differs from the one in use.
    fn newer_kit(&self) -> Option<ClientKit> {
        match ClientKit::load(&self.kit.dir) {
            Ok(kit) if kit.identity != self.kit.identity => {
                tracing::error!(
                    kit = %self.kit.dir.display(),
                    "the kit folder now holds {}'s kit, not {}'s; keeping the one in use",
                    kit.identity,
                    self.kit.identity
                );
                None
            }
            Ok(kit) => kit.material_differs(&self.kit).then_some(kit),
            Err(e) => {
                tracing::warn!("the kit does not read now, keeping the one in use: {e}");
                None
            }
        }
    }

    /// Picks up a changed dataset (a case added since the last round). Reading it is file work:
    /// on a multi-threaded runtime the other tasks move to other threads meanwhile.
    fn refresh_data(&mut self) {
        let multi_threaded = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        let refreshed = if multi_threaded {
            tokio::task::block_in_place(|| self.data.refresh())
        } else {
            self.data.refresh()
        };
        match refreshed {
            None => {}
            Some(Ok(notes)) => {
                self.prepared = None;
                tracing::info!(
                    slices = self.data.slices().len(),
                    skipped = notes.skipped.len(),
                    "the dataset changed; training on it as it is now"
                );
                for case in &notes.skipped {
                    tracing::warn!(case = %case.id, "case skipped for errors");
                }
            }
            Some(Err(e)) => tracing::warn!(
                slices = self.data.slices().len(),
                "the dataset changed but cannot be loaded; training on what was loaded before: {e}"
            ),
        }
    }

    /// Measures a finished round's global model on the site's validation cases and reports
    /// Dice per class and the case count: nothing else of them leaves. A site without
    /// validation cases says so (0 cases), so that the run does not wait for it.
    async fn evaluate(
        &mut self,
        client: &mut Federation,
        task: EvaluateTask,
    ) -> Result<(), AgentError> {
        self.refresh_data();
        let validation = match self.data.validation().cloned() {
            None => {
                // Nothing to measure, but under FedBN the site's own model is still wanted.
                if task.site_normalisation && self.options.site_models.is_some() {
                    self.model_for_site(client, &task).await?;
                }
                no_validation()
            }
            Some((slices, cases)) => {
                let global = self.model_for_site(client, &task).await?;
                let device = self.resolved.device.clone();
                let measured =
                    tokio::task::spawn_blocking(move || measure(&global, &slices, cases, &device))
                        .await;
                match training_ended(measured)? {
                    Ok(validation) => validation,
                    Err(e) => {
                        tracing::warn!(
                            round = task.round,
                            "the round's model cannot be measured here: {e}"
                        );
                        return Ok(());
                    }
                }
            }
        };
        tracing::info!(
            run = %task.run_id,
            round = task.round,
            model_of = task.model_of.as_deref().unwrap_or("the federation"),
            cases = validation.cases,
            infection_dice = validation.infection_dice.map(|d| format!("{d:.3}")),
            "validation of a model of the run"
        );
        let report = ValidationReport {
            run_id: task.run_id,
            round: task.round,
            model_version: task.model_version,
            validation,
        };
        match report_validation(client, report).await {
            Ok(()) => Ok(()),
            Err(s) if verdict(&s) == Verdict::SkipRound => {
                tracing::warn!(round = task.round, "validation not taken: {}", s.message());
                Ok(())
            }
            Err(s) => Err(status_error(s)),
        }
    }

    async fn train_round(
        &mut self,
        client: &mut Federation,
        task: TrainTask,
    ) -> Result<(), AgentError> {
        // Under secure aggregation the keys are exchanged first, while every site is still
        // waiting for the round, so that training is not held up by the slowest site.
        let mut traffic = Traffic::default();
        self.options.metrics.round_given(task.round);
        let outcome = self.take_part(client, &task, &mut traffic).await;
        self.options.metrics.traffic(traffic.sent, traffic.received);
        outcome
    }

    /// A round's work: keys (secure aggregation), pull, training, push, reveal. Counts the
    /// round's protocol traffic in `traffic` (the model download goes straight to the metrics).
    async fn take_part(
        &mut self,
        client: &mut Federation,
        task: &TrainTask,
        traffic: &mut Traffic,
    ) -> Result<(), AgentError> {
        let session = match task.secure_aggregation {
            None => None,
            Some(secure) => {
                tracing::info!(
                    round = task.round,
                    threshold = secure.threshold,
                    "exchanging keys for secure aggregation"
                );
                match crate::secure::join_round(client, task, &self.kit.identity.name, traffic)
                    .await
                {
                    Ok(session) => Some(session),
                    Err(e) => return skip_round(task.round, e),
                }
            }
        };
        tracing::info!(run = %task.run_id, round = task.round, "pulling global model");
        let (mut global, model_bytes) = pull_model(client, &task.model_version).await?;
        let site_normalisation = task.training.site_normalisation;
        if site_normalisation {
            let placed = self.site_norms.personalise(&task.run_id, &mut global);
            tracing::info!(
                round = task.round,
                tensors = placed,
                "FedBN: this site's normalisation layers in place"
            );
        }
        self.options.metrics.traffic(0, model_bytes);
        let spec = ModelSpec::from_weights(&global).map_err(TrainError::from)?;
        self.refresh_data();
        let slices = match &self.prepared {
            Some((size, slices)) if *size == spec.image_size => slices.clone(),
            _ => {
                let slices = std::sync::Arc::new(self.data.slices().at_size(spec.image_size));
                self.prepared = Some((spec.image_size, slices.clone()));
                slices
            }
        };
        let device = self.resolved.device.clone();
        let round = task.round;
        let mut task_for_training = task.clone();
        if let Some(precision) = self.options.precision
            && precision != task.training.precision
        {
            tracing::info!(
                round,
                run = %task.training.precision,
                site = %precision,
                "training at this site's precision, not the run's"
            );
            task_for_training.training.precision = precision;
        }
        if let Some(caution) = self
            .resolved
            .precision_caution(task_for_training.training.precision)
        {
            tracing::warn!(round, "{caution}");
        }
        let started = std::time::Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            // Seconds per epoch in the log: the site's operator sees what its hardware costs
            // the federation.
            let mut epoch_started = std::time::Instant::now();
            local_update(&global, &slices, &task_for_training, &device, |progress| {
                if let Progress::Epoch { epoch, loss } = progress {
                    tracing::info!(
                        round,
                        epoch,
                        loss = format!("{loss:.4}"),
                        seconds = format!("{:.1}", epoch_started.elapsed().as_secs_f32()),
                        "local epoch done"
                    );
                    epoch_started = std::time::Instant::now();
                }
            })
        })
        .await;
        let LocalUpdate {
            local,
            update,
            samples,
            metrics,
            clipped_from,
        } = training_ended(outcome)??;
        let train_seconds = started.elapsed().as_secs_f64();
        self.options.metrics.trained(started.elapsed(), samples);
        // The process kept training's freed buffers for its next step; between rounds it
        // waits at its resting size instead.
        alveolus_models::device::release_held_memory();
        if site_normalisation {
            self.site_norms = SiteNorms::keep(&task.run_id, &local);
        }
        if let (Some(norm), Some(clip_norm)) = (clipped_from, task.clip_norm) {
            tracing::info!(
                round,
                norm,
                clip_norm,
                "update clipped for differential privacy"
            );
        }
        tracing::info!(
            round,
            loss = format!("{:.4}", metrics.loss),
            dice = format!("{:.3}", metrics.dice),
            seconds = format!("{:.1}", started.elapsed().as_secs_f32()),
            "local training done; pushing update"
        );
        if let Some(session) = session {
            // Under DP every site weighs the same (its noise share assumes it).
            let weight = if task.clip_norm.is_some() {
                1
            } else {
                samples as u64
            };
            let noise_std = task.secure_aggregation.and_then(|s| s.noise_std);
            let words =
                match crate::secure::mask_update(&session, &update, metrics, weight, noise_std) {
                    Ok(words) => words,
                    Err(e) => return skip_round(round, e),
                };
            let (header, bytes) = crate::secure::masked_message(task, &words);
            kept::audit_copy(self.options.audit_dir.as_deref(), &header, &bytes)?;
            match push_update(client, header, &bytes, traffic).await {
                Ok(reports) => {
                    self.options.metrics.update_accepted();
                    tracing::info!(round, reports, "masked update accepted")
                }
                Err(s) => return skip_round(round, s.into()),
            }
            return match crate::secure::reveal(client, task, &session, traffic).await {
                Ok(survivors) => {
                    tracing::info!(
                        round,
                        survivors,
                        sent_bytes = traffic.sent,
                        received_bytes = traffic.received,
                        "shares revealed for unmasking the sum"
                    );
                    Ok(())
                }
                Err(e) => skip_round(round, e),
            };
        }
        let bytes = update.encode();
        let header = UpdateHeader {
            run_id: task.run_id.clone(),
            round: task.round,
            base_version: task.model_version.clone(),
            num_samples: samples as u64,
            metrics,
            total_bytes: bytes.len() as u64,
            masked: false,
            // Under DP the time would hint at the sample count that stays home.
            train_seconds: task.clip_norm.is_none().then_some(train_seconds),
        };
        kept::audit_copy(self.options.audit_dir.as_deref(), &header, &bytes)?;
        match push_update(client, header, &bytes, traffic).await {
            Ok(reports) => {
                self.options.metrics.update_accepted();
                tracing::info!(round, reports, sent_bytes = traffic.sent, "update accepted");
                Ok(())
            }
            // The round moved on without us (deadline), we already reported, or the update was
            // refused: wait for the next round.
            Err(s) if verdict(&s) == Verdict::SkipRound => {
                tracing::warn!(round, "update not used: {}", s.message());
                Ok(())
            }
            Err(s) => Err(status_error(s)),
        }
    }

    /// The model an evaluate task names, as this site uses it: under FedBN with the site's own
    /// normalisation layers, a global model of which is then written to the site-models folder.
    async fn model_for_site(
        &mut self,
        client: &mut Federation,
        task: &EvaluateTask,
    ) -> Result<Weights, AgentError> {
        let (mut model, model_bytes) = pull_model(client, &task.model_version).await?;
        self.options.metrics.traffic(0, model_bytes);
        if task.site_normalisation
            && self.site_norms.personalise(&task.run_id, &mut model) > 0
            && task.model_of.is_none()
            && let Some(dir) = &self.options.site_models
        {
            kept::site_model(dir, &self.kit.identity.name, task, &model)?;
        }
        Ok(model)
    }
}

/// A secure-aggregation step failed: the round goes on without this site, or fails for all;
/// a transport error means reconnecting.
fn skip_round(round: u32, error: SecureError) -> Result<(), AgentError> {
    match error {
        SecureError::Status(s) if verdict(&s) != Verdict::SkipRound => Err(status_error(s)),
        e => {
            tracing::warn!(round, "this site takes no further part in the round: {e}");
            Ok(())
        }
    }
}

/// The end of the training task: a panic in it is fatal (the same data and model would panic
/// again after every reconnection), not a transport error.
fn training_ended<T>(joined: Result<T, tokio::task::JoinError>) -> Result<T, AgentError> {
    joined.map_err(|e| match e.try_into_panic() {
        Ok(panic) => AgentError::TrainingPanicked(panic_message(panic.as_ref())),
        Err(e) => AgentError::Rpc(format!("training task failed: {e}")),
    })
}

/// What a panic said, as far as it is text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_training_stops_the_agent_with_its_message() {
        let joined = tokio::task::spawn_blocking(|| -> u32 { panic!("index out of bounds") }).await;
        let error = training_ended(joined).unwrap_err();
        assert!(matches!(&error, AgentError::TrainingPanicked(m) if m == "index out of bounds"));
        assert!(error.to_string().contains("the agent stops"), "{error}");
    }
}
