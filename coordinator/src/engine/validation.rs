//! The sites' validation of each round's model: reports written to the run log as they
//! arrive, and the run's completion once the sites of its last round have reported on its
//! final model (or its deadline passed).

use std::sync::Arc;

use alveolus_proto::domain::{SiteValidation, ValidationReport};

use super::writes::blocking;
use super::{Coordinator, Phase};
use crate::error::CoordinatorError;
use crate::run;

impl Coordinator {
    /// Records `site`'s validation of a finished round's model, durably, and completes the
    /// run when it was the last one its final model waited for.
    pub async fn accept_validation(
        self: &Arc<Self>,
        site: &str,
        report: ValidationReport,
    ) -> Result<(), CoordinatorError> {
        let _writer = self.writer.lock().await;
        let (index, record) = {
            let mut state = self.lock();
            state.touch(site);
            let index = state.run_index(&report.run_id)?;
            let run = &state.runs[index];
            run.check_validation(site, report.round, &report.model_version)?;
            let mut record = run.info.clone();
            let validation = SiteValidation {
                site: site.to_string(),
                validation: report.validation.clone(),
            };
            run::add_validation(&mut record, report.round, &report.model_version, validation);
            (index, record)
        };
        let store = self.store.clone();
        blocking(move || store.put_run(&record)).await?;
        let validation = &report.validation;
        tracing::info!(
            run = %report.run_id,
            round = report.round,
            %site,
            model = %&report.model_version[..12],
            cases = validation.cases,
            infection_dice = ?validation.infection_dice,
            "site validated the round's model"
        );
        let mut state = self.lock();
        state.runs[index].validated(
            report.round,
            &report.model_version,
            SiteValidation {
                site: site.to_string(),
                validation: report.validation,
            },
        );
        if let Phase::Validating {
            run_id, awaiting, ..
        } = &mut state.phase
            && *run_id == report.run_id
        {
            awaiting.remove(&(site.to_string(), report.model_version.clone()));
        }
        drop(_writer);
        self.settle(state, true);
        Ok(())
    }

    /// Completes run `index`, whose sites have validated its final model (or were waited for
    /// long enough). A write that fails is retried at the next tick.
    pub(super) async fn complete_run(self: Arc<Self>, index: usize) {
        let _writer = self.writer.lock().await;
        let info = {
            let state = self.lock();
            let run = &state.runs[index];
            let closing =
                matches!(&state.phase, Phase::Closing { run_id, .. } if *run_id == run.info.run_id);
            if !run.is_running() || !closing {
                return;
            }
            run::completed(&run.info)
        };
        let store = self.store.clone();
        let record = info.clone();
        if let Err(e) = blocking(move || store.put_run(&record)).await {
            tracing::error!(run = %info.run_id, "the completed run cannot be saved, retrying: {e}");
            let mut state = self.lock();
            state.await_validation(index, crate::clock::now());
            if let Phase::Validating { awaiting, .. } = &mut state.phase {
                awaiting.clear();
            }
            return;
        }
        tracing::info!(run = %info.run_id, "run completed");
        let mut state = self.lock();
        state.phase = Phase::Idle;
        state.runs[index].ended(info);
        drop(state);
        self.announce();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use alveolus_proto::domain::{
        ClassDice, EvaluateTask, RunInfo, RunState, Task, Validation, ValidationReport,
    };

    use super::super::Coordinator;
    use super::super::tests::{config, finished, model, open, push, take_task};
    use crate::error::CoordinatorError;
    use crate::store::Store;

    fn evaluation(coordinator: &Coordinator, site: &str) -> EvaluateTask {
        match coordinator.try_task(site) {
            Some(Task::Evaluate(task)) => task,
            other => panic!("{site} was not asked to evaluate: {other:?}"),
        }
    }

    fn report(task: &EvaluateTask, cases: u32, infection: f64) -> ValidationReport {
        ValidationReport {
            run_id: task.run_id.clone(),
            round: task.round,
            model_version: task.model_version.clone(),
            validation: Validation {
                cases,
                infection_dice: (cases > 0).then_some(infection),
                classes: vec![ClassDice {
                    class: "ggo".into(),
                    dice: (cases > 0).then_some(infection),
                }],
            },
        }
    }

    /// Waits until the run has ended.
    async fn ended(coordinator: &Coordinator, run_id: &str) -> RunInfo {
        let mut changes = coordinator.changed.subscribe();
        loop {
            let info = coordinator.run(run_id).unwrap();
            if info.state != RunState::Running {
                return info;
            }
            changes.changed().await.unwrap();
        }
    }

    /// (round, site, infection Dice) of every validation in a run's record.
    fn recorded(info: &RunInfo) -> Vec<(u32, String, Option<f64>)> {
        info.rounds
            .iter()
            .flat_map(|r| {
                r.validation
                    .iter()
                    .map(move |v| (r.round, v.site.clone(), v.validation.infection_dice))
            })
            .collect()
    }

    /// Each finished round's model is measured at each site before it trains the next round;
    /// the run completes only once the sites of its last round have reported on its final
    /// model, and every report is in the run log on disk.
    #[tokio::test(start_paused = true)]
    async fn sites_validate_each_rounds_model_and_the_run_completes_after_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = open(dir.path());
        let mut validated = config(2, 60);
        validated.rounds = 2;
        validated.validate_at_sites = true;
        let run = coordinator
            .start_run(validated, &model(0.0).encode())
            .await
            .unwrap();
        assert!(
            coordinator
                .try_task("a")
                .is_some_and(|t| matches!(t, Task::Train(_))),
            "nothing to measure before the first round"
        );
        for site in ["a", "b"] {
            let task = take_task(&coordinator, site);
            push(&coordinator, site, &task, 1.0).unwrap();
        }
        let info = finished(&coordinator, &run.run_id, 1).await;
        let first = evaluation(&coordinator, "a");
        assert_eq!(
            (first.round, first.model_version.as_str()),
            (1, info.rounds[0].version.as_str())
        );
        assert!(
            matches!(coordinator.try_task("a"), Some(Task::Train(t)) if t.round == 2),
            "an evaluation is handed once, then the site trains"
        );
        coordinator
            .accept_validation("a", report(&first, 3, 0.5))
            .await
            .unwrap();
        let again = coordinator
            .accept_validation("a", report(&first, 3, 0.9))
            .await;
        assert!(
            matches!(again, Err(CoordinatorError::AlreadyReported { .. })),
            "{again:?}"
        );
        let mut forged = report(&first, 3, 0.5);
        forged.model_version = "c".repeat(64);
        let refused = coordinator.accept_validation("b", forged).await;
        assert!(
            matches!(refused, Err(CoordinatorError::ValidationRefused { .. })),
            "{refused:?}"
        );
        // b takes its evaluation but never reports: round 1 goes on without it.
        evaluation(&coordinator, "b");
        for site in ["a", "b"] {
            let task = take_task(&coordinator, site);
            push(&coordinator, site, &task, 2.0).unwrap();
        }
        let info = finished(&coordinator, &run.run_id, 2).await;
        assert_eq!(
            info.state,
            RunState::Running,
            "waiting for the final model's validation"
        );
        let last = [evaluation(&coordinator, "a"), evaluation(&coordinator, "b")];
        assert_eq!(last[0].model_version, info.rounds[1].version);
        assert!(
            coordinator.try_task("a").is_none(),
            "no round after the last"
        );
        coordinator
            .accept_validation("a", report(&last[0], 3, 0.7))
            .await
            .unwrap();
        assert_eq!(
            coordinator.run(&run.run_id).unwrap().state,
            RunState::Running
        );
        coordinator
            .accept_validation("b", report(&last[1], 0, 0.0))
            .await
            .unwrap();
        let info = ended(&coordinator, &run.run_id).await;
        assert_eq!(info.state, RunState::Completed);
        let expected = vec![
            (1, "a".to_string(), Some(0.5)),
            (2, "a".to_string(), Some(0.7)),
            (2, "b".to_string(), None),
        ];
        assert_eq!(recorded(&info), expected);
        let stored = Store::open(dir.path()).unwrap().load_runs().unwrap();
        assert_eq!(
            recorded(&stored[0]),
            expected,
            "the run log holds every report"
        );
        assert_eq!(stored[0].state, RunState::Completed);
        let late = coordinator
            .accept_validation("b", report(&first, 3, 0.5))
            .await;
        assert!(
            matches!(late, Err(CoordinatorError::ValidationRefused { .. })),
            "{late:?}"
        );
    }

    /// A coordinator restarted while the sites validate the final model asks them again; a
    /// site that never reports holds the run up only until the round deadline.
    #[tokio::test(start_paused = true)]
    async fn the_final_validation_survives_a_restart_and_waits_no_longer_than_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let mut coordinator = open(dir.path());
        let mut validated = config(2, 60);
        validated.rounds = 1;
        validated.validate_at_sites = true;
        let run = coordinator
            .start_run(validated, &model(0.0).encode())
            .await
            .unwrap();
        for site in ["a", "b"] {
            let task = take_task(&coordinator, site);
            push(&coordinator, site, &task, 1.0).unwrap();
        }
        finished(&coordinator, &run.run_id, 1).await;
        evaluation(&coordinator, "a");
        drop(coordinator);
        coordinator = open(dir.path());
        assert_eq!(coordinator.phase().0, "validating");
        let task = evaluation(&coordinator, "a");
        coordinator
            .accept_validation("a", report(&task, 2, 0.6))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        coordinator.tick();
        tokio::task::yield_now().await;
        assert_eq!(
            coordinator.run(&run.run_id).unwrap().state,
            RunState::Running
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        coordinator.tick();
        let info = ended(&coordinator, &run.run_id).await;
        assert_eq!(info.state, RunState::Completed);
        assert_eq!(recorded(&info), vec![(1, "a".to_string(), Some(0.6))]);
    }

    /// Cross-site evaluation: after the last round every site measures the global model and
    /// each site's local model (the round's model plus its update, kept in the registry as
    /// such), and the run completes once all of them are in.
    #[tokio::test(start_paused = true)]
    async fn every_site_measures_every_sites_local_model_after_the_last_round() {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = open(dir.path());
        let mut crossed = config(2, 60);
        crossed.rounds = 1;
        crossed.validate_at_sites = true;
        crossed.cross_site_evaluation = true;
        let run = coordinator
            .start_run(crossed, &model(0.0).encode())
            .await
            .unwrap();
        for (site, value) in [("a", 1.0), ("b", 3.0)] {
            let task = take_task(&coordinator, site);
            push(&coordinator, site, &task, value).unwrap();
        }
        let info = finished(&coordinator, &run.run_id, 1).await;
        let global = info.rounds[0].version.clone();
        let owners: Vec<&str> = info.local_models.iter().map(|m| m.site.as_str()).collect();
        assert_eq!(owners, ["a", "b"]);
        for (local, value) in info.local_models.iter().zip([1.0, 3.0]) {
            let (bytes, manifest) = coordinator.model(&local.version).unwrap();
            let weights = alveolus_proto::weights::Weights::decode(&bytes).unwrap();
            assert_eq!(
                weights.tensors["w"].values,
                vec![value; 4],
                "{}",
                local.site
            );
            assert_eq!(manifest.local_of.as_deref(), Some(local.site.as_str()));
        }
        for site in ["a", "b"] {
            let mut asked = Vec::new();
            while let Some(Task::Evaluate(task)) = coordinator.try_task(site) {
                asked.push((task.model_of.clone(), task.model_version.clone()));
                coordinator
                    .accept_validation(site, report(&task, 2, 0.5))
                    .await
                    .unwrap();
            }
            let expected = vec![
                (None, global.clone()),
                (Some("a".to_string()), info.local_models[0].version.clone()),
                (Some("b".to_string()), info.local_models[1].version.clone()),
            ];
            assert_eq!(asked, expected, "{site}");
        }
        let info = ended(&coordinator, &run.run_id).await;
        assert_eq!(info.state, RunState::Completed);
        assert_eq!(info.rounds[0].validation.len(), 2);
        let matrix: Vec<(String, String)> = info
            .cross_site
            .iter()
            .map(|c| (c.model_of.clone(), c.validation.site.clone()))
            .collect();
        assert_eq!(
            matrix,
            [("a", "a"), ("b", "a"), ("a", "b"), ("b", "b")]
                .map(|(m, s)| (m.to_string(), s.to_string()))
        );
        let stored = Store::open(dir.path()).unwrap().load_runs().unwrap();
        assert_eq!(stored[0].cross_site, info.cross_site, "in the run log");
        assert_eq!(stored[0].local_models, info.local_models);
    }
}
