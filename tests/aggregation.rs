//! Aggregation beyond FedAvg, end to end over mTLS with the sites' real certificates (the test
//! plays the sites): DP-FedAvg's clipping contract, ε per round and the budget stop; the
//! coordinate-wise median against a hostile site; the norm bound.

mod common;

use std::time::Duration;

use alveolus_proto::domain::Task;
use alveolus_proto::domain::{
    AggregationConfig, AggregationRule, PrivacyConfig, RunConfig, RunState,
};
use alveolus_proto::pb::{self, federation_client::FederationClient};
use common::*;
use tonic::Code;

async fn site(project: &Project, name: &str) -> FederationClient<tonic::transport::Channel> {
    FederationClient::new(connect(&project.site_kit(name)).await)
}

fn dp_config(rounds: u32, budget: Option<f64>) -> RunConfig {
    RunConfig {
        privacy: Some(PrivacyConfig {
            clip_norm: 1.0,
            noise_multiplier: NOISE,
            delta: DELTA,
            epsilon_budget: budget,
        }),
        ..run_config(rounds, 2, 120)
    }
}

const NOISE: f64 = 2.0;
const DELTA: f64 = 1e-5;

fn epsilon(rounds: u64) -> f64 {
    alveolus_privacy::epsilon_after(1.0, NOISE, rounds, DELTA)
        .unwrap()
        .epsilon
}

/// An update of L2 norm `norm` in the layout of `model`.
fn update_of_norm(model: &alveolus_models::Weights, norm: f32) -> alveolus_models::Weights {
    constant_update(model, norm / (model.num_values() as f32).sqrt())
}

#[tokio::test(flavor = "multi_thread")]
async fn dp_sites_are_told_to_clip_and_unclipped_updates_are_refused() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let model = tiny_model(5);
    let mut admin = admin(&project).await;
    start_run(&mut admin, dp_config(3, None), &model).await;
    let mut alpha = site(&project, "alpha").await;
    let mut beta = site(&project, "beta").await;
    let task_a = join_and_take_task(&mut alpha, "t", 10).await;
    assert_eq!(task_a.clip_norm, Some(1.0), "sites are told to clip");
    let task_b = join_and_take_task(&mut beta, "t", 10).await;
    push_update(&mut alpha, &task_a, &update_of_norm(&model, 0.5), 1)
        .await
        .unwrap();
    // An unclipped update would void the guarantee: refused, and not asked for again this round.
    let status = push_update(&mut beta, &task_b, &update_of_norm(&model, 2.0), 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("L2 norm"), "{}", status.message());
    let again = push_update(&mut beta, &task_b, &update_of_norm(&model, 0.5), 1)
        .await
        .unwrap_err();
    assert!(
        again.message().contains("was refused"),
        "{}",
        again.message()
    );
    let next = beta
        .next_task(pb::NextTaskRequest { wait_seconds: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(Task::try_from(next).unwrap(), Task::Wait { .. }));
    // One site is not the quorum of two: the round stays open.
    assert!(get_run(&mut admin, "").await.rounds.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn dp_run_reports_epsilon_and_stops_at_its_budget() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let model = tiny_model(5);
    let mut admin = admin(&project).await;
    // A budget that one round already exceeds is refused at the start.
    let refused = admin
        .start_run(start_run_stream(
            dp_config(10, Some(epsilon(1) / 2.0)),
            &model,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("one round already spends"),
        "{}",
        refused.message()
    );
    // Room for three rounds of ten, not four.
    let budget = (epsilon(3) + epsilon(4)) / 2.0;
    let run = start_run(&mut admin, dp_config(10, Some(budget)), &model).await;
    let small = update_of_norm(&model, 0.5);
    let mut alpha = site(&project, "alpha").await;
    let mut beta = site(&project, "beta").await;
    for _ in 1..=3 {
        let task_a = join_and_take_task(&mut alpha, "t", 10).await;
        let task_b = join_and_take_task(&mut beta, "t", 10).await;
        push_update(&mut alpha, &task_a, &small, 1).await.unwrap();
        push_update(&mut beta, &task_b, &small, 7).await.unwrap();
    }
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Completed);
    assert_eq!(
        run.rounds.len(),
        3,
        "the budget stops the run after round 3 of 10"
    );
    for (i, round) in run.rounds.iter().enumerate() {
        assert!((round.epsilon.unwrap() - epsilon(i as u64 + 1)).abs() < 1e-12);
    }
    assert!(
        run.stop_reason
            .as_deref()
            .unwrap()
            .contains("privacy budget"),
        "{:?}",
        run.stop_reason
    );
    // Every checkpoint's manifest carries the guarantee.
    let models = project.state().join("models");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(models.join(format!("{}.json", run.rounds[2].version))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["privacy"]["noise_multiplier"], NOISE);
    assert_eq!(manifest["epsilon"].as_f64().unwrap(), epsilon(3));
    // Noise of std z·C = 2 on the sum of two equally weighted updates (sample counts 1 and 7
    // do not matter under DP): std 1 per value of the mean, around the updates' value.
    let first = read_weights(&models.join(format!("{}.safetensors", run.rounds[0].version)));
    let moved: Vec<f64> = first
        .tensors
        .iter()
        .flat_map(|(name, t)| {
            t.values
                .iter()
                .zip(&model.tensors[name].values)
                .map(|(a, b)| (a - b) as f64)
                .collect::<Vec<_>>()
        })
        .collect();
    let n = moved.len() as f64;
    let mean = moved.iter().sum::<f64>() / n;
    let std = (moved.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!((std - 1.0).abs() < 0.05, "{std}");
}

#[tokio::test(flavor = "multi_thread")]
async fn median_ignores_a_hostile_site_and_the_norm_bound_refuses_it() {
    let project = project(&["alpha", "beta", "gamma"]);
    let _coordinator = start_coordinator(&project).await;
    let model = tiny_model(6);
    let mut admin = admin(&project).await;
    let config = RunConfig {
        aggregation: AggregationConfig {
            rule: AggregationRule::Median,
            norm_bound: None,
        },
        ..run_config(1, 3, 120)
    };
    let run = start_run(&mut admin, config, &model).await;
    let mut clients = Vec::new();
    for (name, value) in [("alpha", 0.01f32), ("beta", 0.02), ("gamma", 1000.0)] {
        let mut client = site(&project, name).await;
        let task = join_and_take_task(&mut client, "t", 10).await;
        push_update(&mut client, &task, &constant_update(&model, value), 1)
            .await
            .unwrap();
        clients.push(client);
    }
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state != RunState::Running
    })
    .await;
    let merged = read_weights(
        &project
            .state()
            .join("models")
            .join(format!("{}.safetensors", run.rounds[0].version)),
    );
    for (name, tensor) in &merged.tensors {
        for (value, base) in tensor.values.iter().zip(&model.tensors[name].values) {
            assert_eq!(*value, base + 0.02, "{name}");
        }
    }

    // FedAvg with a norm bound: the hostile update is refused and the round closes without it.
    let config = RunConfig {
        aggregation: AggregationConfig {
            rule: AggregationRule::FedAvg,
            norm_bound: Some(1.0),
        },
        ..run_config(1, 2, 120)
    };
    let run = start_run(&mut admin, config, &model).await;
    // Everyone takes the task first, so the round waits for all three.
    let mut tasks = Vec::new();
    for client in &mut clients {
        tasks.push(join_and_take_task(client, "t", 10).await);
    }
    let mut results = Vec::new();
    for ((value, client), task) in [0.0001f32, 0.0001, 1000.0]
        .into_iter()
        .zip(&mut clients)
        .zip(&tasks)
    {
        results.push((
            value,
            push_update(client, task, &constant_update(&model, value), 1).await,
        ));
    }
    let (_, refused) = &results[2];
    let status = refused.as_ref().unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("above this run's bound"),
        "{}",
        status.message()
    );
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Completed);
    assert_eq!(
        run.rounds[0].sites,
        vec!["alpha".to_string(), "beta".into()]
    );
}
