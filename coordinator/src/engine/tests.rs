//! The engine's behaviour over time, on a paused clock: quorum, deadline, refusals, durability
//! before announcement, restart.

use std::sync::Arc;
use std::time::Duration;

use alveolus_proto::domain::{
    Metrics, RunConfig, RunInfo, RunState, Task, TrainTask, UpdateHeader,
};
use alveolus_proto::weights::Weights;

use super::{Coordinator, EngineSettings};
use crate::error::CoordinatorError;
use crate::store::Store;
use alveolus_proto::domain::{AggregationConfig, TrainingConfig};
use alveolus_proto::weights::Tensor;

pub(super) fn model(value: f32) -> Weights {
    let mut weights = Weights::default();
    weights.metadata.insert(
        alveolus_proto::weights::MODEL_METADATA_KEY.into(),
        r#"{"kind":"unet2d"}"#.into(),
    );
    weights.tensors.insert(
        "w".into(),
        Tensor {
            shape: vec![4],
            values: vec![value; 4],
        },
    );
    weights
}

pub(super) fn config(min_sites: u32, deadline_seconds: u32) -> RunConfig {
    RunConfig {
        rounds: 3,
        min_sites,
        deadline_seconds,
        training: TrainingConfig::default(),
        privacy: None,
        aggregation: AggregationConfig::default(),
        secure_aggregation: None,
        schedule: None,
        server_optimizer: None,
        validate_at_sites: false,
        cross_site_evaluation: false,
    }
}

pub(super) fn open(dir: &std::path::Path) -> Arc<Coordinator> {
    Coordinator::open(EngineSettings {
        project: "lungs".into(),
        state_dir: dir.to_path_buf(),
        upload_slots: 2,
        max_model_bytes: 1 << 20,
        max_long_poll: Duration::from_secs(30),
    })
    .unwrap()
}

/// The site's train task, which it must be handed now.
pub(super) fn take_task(coordinator: &Coordinator, site: &str) -> TrainTask {
    match coordinator.try_task(site) {
        Some(Task::Train(task)) => task,
        other => panic!("{site} got no task: {other:?}"),
    }
}

pub(super) fn push(
    coordinator: &Arc<Coordinator>,
    site: &str,
    task: &TrainTask,
    value: f32,
) -> Result<usize, CoordinatorError> {
    let header = UpdateHeader {
        run_id: task.run_id.clone(),
        round: task.round,
        base_version: task.model_version.clone(),
        num_samples: 1,
        metrics: Metrics::default(),
        total_bytes: 0,
        masked: false,
        train_seconds: None,
    };
    coordinator.accept_update(site, &header, &model(value))
}

/// Waits until run `run_id` has finished `rounds` rounds in memory.
pub(super) async fn finished(coordinator: &Coordinator, run_id: &str, rounds: usize) -> RunInfo {
    let mut changes = coordinator.changed.subscribe();
    loop {
        let info = coordinator.run(run_id).unwrap();
        if info.rounds.len() >= rounds {
            return info;
        }
        changes.changed().await.unwrap();
    }
}

/// Each round's task carries the schedule's learning rate for that round, and a restarted
/// coordinator goes on with the same rates: they follow from the stored config and the round.
#[tokio::test(start_paused = true)]
async fn every_task_carries_its_rounds_learning_rate_across_a_restart() {
    use alveolus_proto::domain::LearningRateSchedule;
    let dir = tempfile::tempdir().unwrap();
    let mut scheduled = config(1, 60);
    scheduled.rounds = 4;
    scheduled.training.learning_rate = 0.01;
    scheduled.schedule = Some(LearningRateSchedule {
        warmup_rounds: 1,
        cosine: true,
        final_fraction: 0.0,
    });
    // Warm-up to the peak, then half a cosine over rounds 2..=4: cos(0), cos(π/2), cos(π).
    let expected = [0.01, 0.01, 0.005, 0.0];
    let mut coordinator = open(dir.path());
    let run = coordinator
        .start_run(scheduled, &model(0.0).encode())
        .await
        .unwrap();
    for (round, rate) in expected.iter().enumerate() {
        let round = round as u32 + 1;
        if round == 3 {
            drop(coordinator);
            coordinator = open(dir.path());
        }
        let task = take_task(&coordinator, "a");
        assert_eq!(task.round, round);
        assert!(
            (task.training.learning_rate - rate).abs() < 1e-12,
            "round {round}: {}",
            task.training.learning_rate
        );
        push(&coordinator, "a", &task, 1.0).unwrap();
        finished(&coordinator, &run.run_id, round as usize).await;
    }
}

/// FedAdam over three rounds of recorded updates gives the models the paper's formulas give,
/// computed here independently, with a coordinator restart between rounds 2 and 3: its moments
/// are read back from the state folder, not kept only in memory.
#[tokio::test(start_paused = true)]
async fn fedadam_checkpoints_follow_the_formulas_across_a_restart() {
    use alveolus_proto::domain::{ServerOptimizer, ServerOptimizerKind};
    let dir = tempfile::tempdir().unwrap();
    let optimizer = ServerOptimizer {
        kind: ServerOptimizerKind::FedAdam,
        learning_rate: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        tau: 0.01,
    };
    let mut adam = config(1, 60);
    adam.server_optimizer = Some(optimizer);
    let updates = [1.0f32, -0.5, 2.0];
    let (mut x, mut m, mut v) = (0.0f64, 0.0f64, 0.01f64 * 0.01);
    let mut expected = Vec::new();
    for d in updates {
        let d = f64::from(d);
        m = 0.9 * m + 0.1 * d;
        v = 0.99 * v + 0.01 * d * d;
        x += 0.1 * m / (v.sqrt() + 0.01);
        expected.push(x);
    }

    let mut coordinator = open(dir.path());
    let run = coordinator
        .start_run(adam, &model(0.0).encode())
        .await
        .unwrap();
    for (round, (update, want)) in updates.iter().zip(&expected).enumerate() {
        let round = round + 1;
        if round == 3 {
            drop(coordinator);
            coordinator = open(dir.path());
        }
        let task = take_task(&coordinator, "a");
        push(&coordinator, "a", &task, *update).unwrap();
        let info = finished(&coordinator, &run.run_id, round).await;
        let (bytes, _) = coordinator.model(&info.rounds[round - 1].version).unwrap();
        for &got in &Weights::decode(&bytes).unwrap().tensors["w"].values {
            assert!(
                (f64::from(got) - want).abs() < 1e-6,
                "round {round}: {got} != {want}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_round_is_durable_before_it_is_announced_and_the_next_one_opens() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open(dir.path());
    let run = coordinator
        .start_run(config(2, 60), &model(0.0).encode())
        .await
        .unwrap();
    let (a, b) = (take_task(&coordinator, "a"), take_task(&coordinator, "b"));
    push(&coordinator, "a", &a, 1.0).unwrap();
    let mut changes = coordinator.changed.subscribe();
    changes.borrow_and_update();
    push(&coordinator, "b", &b, 3.0).unwrap();
    // While the round closes it takes nothing more.
    assert!(coordinator.try_task("c").is_none());
    loop {
        changes.changed().await.unwrap();
        if !coordinator.run(&run.run_id).unwrap().rounds.is_empty() {
            break;
        }
    }
    // Announced: by then the run log on disk has the round, and its checkpoint exists.
    let stored = Store::open(dir.path()).unwrap().load_runs().unwrap();
    assert_eq!(stored[0].rounds.len(), 1);
    let version = &stored[0].rounds[0].version;
    let (bytes, manifest) = coordinator.model(version).unwrap();
    assert_eq!(manifest.round, 1);
    assert_eq!(
        Weights::decode(&bytes).unwrap().tensors["w"].values,
        vec![2.0; 4]
    );
    let next = take_task(&coordinator, "a");
    assert_eq!((next.round, &next.model_version), (2, version));
}

#[tokio::test(start_paused = true)]
async fn a_site_that_took_the_task_and_vanished_holds_the_round_until_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open(dir.path());
    let run = coordinator
        .start_run(config(1, 60), &model(0.0).encode())
        .await
        .unwrap();
    let (a, _gone) = (
        take_task(&coordinator, "a"),
        take_task(&coordinator, "gone"),
    );
    push(&coordinator, "a", &a, 1.0).unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    coordinator.tick();
    tokio::task::yield_now().await;
    assert!(coordinator.run(&run.run_id).unwrap().rounds.is_empty());
    tokio::time::advance(Duration::from_secs(2)).await;
    coordinator.tick();
    let info = finished(&coordinator, &run.run_id, 1).await;
    assert_eq!(info.rounds[0].sites, vec!["a"]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_update_is_neither_used_nor_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open(dir.path());
    let mut config = config(1, 600);
    config.aggregation.norm_bound = Some(10.0);
    let run = coordinator
        .start_run(config, &model(0.0).encode())
        .await
        .unwrap();
    let (a, bad) = (take_task(&coordinator, "a"), take_task(&coordinator, "bad"));
    push(&coordinator, "a", &a, 1.0).unwrap();
    let refused = push(&coordinator, "bad", &bad, 100.0);
    assert!(matches!(refused, Err(CoordinatorError::UpdateNorm { .. })));
    // No deadline passed: the round closed because nobody else was waited for.
    let info = finished(&coordinator, &run.run_id, 1).await;
    assert_eq!(info.rounds[0].sites, vec!["a"]);
    let (bytes, _) = coordinator.model(&info.rounds[0].version).unwrap();
    assert_eq!(
        Weights::decode(&bytes).unwrap().tensors["w"].values,
        vec![1.0; 4]
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_coordinator_resumes_at_the_next_round_and_an_aborted_run_stays_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open(dir.path());
    let run = coordinator
        .start_run(config(1, 60), &model(0.0).encode())
        .await
        .unwrap();
    let a = take_task(&coordinator, "a");
    push(&coordinator, "a", &a, 1.0).unwrap();
    let info = finished(&coordinator, &run.run_id, 1).await;
    drop(coordinator);

    let restarted = open(dir.path());
    let resumed = restarted.run(&run.run_id).unwrap();
    assert_eq!(resumed.state, RunState::Running);
    let task = take_task(&restarted, "a");
    assert_eq!(
        (task.round, &task.model_version),
        (2, &info.rounds[0].version)
    );
    let stale = push(&restarted, "a", &a, 1.0);
    assert!(matches!(
        stale,
        Err(CoordinatorError::WrongRound {
            got: 1,
            expected: 2
        })
    ));

    restarted.abort(&run.run_id).await.unwrap();
    assert!(restarted.try_task("a").is_none());
    drop(restarted);
    let again = open(dir.path());
    assert_eq!(again.run(&run.run_id).unwrap().state, RunState::Aborted);
    assert!(again.try_task("a").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_round_that_makes_no_finite_model_fails_its_run_and_keeps_the_last_model() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open(dir.path());
    // Noise far beyond f32's range: every update is fine, the noised sum is not.
    let mut config = config(1, 60);
    config.privacy = Some(alveolus_proto::domain::PrivacyConfig {
        clip_norm: 1e30,
        noise_multiplier: 1e10,
        delta: 1e-5,
        epsilon_budget: None,
    });
    let run = coordinator
        .start_run(config, &model(0.0).encode())
        .await
        .unwrap();
    let task = take_task(&coordinator, "a");
    push(&coordinator, "a", &task, 1.0).unwrap();
    let mut changes = coordinator.changed.subscribe();
    let info = loop {
        let info = coordinator.run(&run.run_id).unwrap();
        if info.state != RunState::Running {
            break info;
        }
        changes.changed().await.unwrap();
    };
    assert_eq!(info.state, RunState::Failed);
    assert!(info.rounds.is_empty());
    let reason = info.stop_reason.unwrap();
    assert!(
        reason.contains("not finite") && reason.contains(&task.model_version),
        "{reason}"
    );
    // Durably so, and the initial model is still the latest.
    let stored = Store::open(dir.path()).unwrap().load_runs().unwrap();
    assert_eq!(stored[0].state, RunState::Failed);
    assert_eq!(stored[0].latest_version(), task.model_version);
}

#[tokio::test(start_paused = true)]
async fn an_initial_model_that_describes_no_network_starts_no_run() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open(dir.path());
    let mut bare = model(0.0);
    bare.metadata.clear();
    let refused = coordinator
        .start_run(config(1, 60), &bare.encode())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("alveolus.model"), "{refused}");
    let mut garbled = model(0.0);
    garbled
        .metadata
        .insert("alveolus.model".into(), "not json".into());
    assert!(
        coordinator
            .start_run(config(1, 60), &garbled.encode())
            .await
            .is_err()
    );
    assert!(coordinator.runs().is_empty());
}
