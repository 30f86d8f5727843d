//! Rounds end to end: real coordinator, real agent processes over mTLS, real CT slices.

mod common;

use std::time::Duration;

use alveolus_proto::domain::RunState;
use alveolus_proto::sha256_hex;
use common::*;

/// The round-2 checkpoint is the FedAvg of the two sites' updates, computed here from what the
/// agents recorded sending, and its manifest describes it truthfully.
#[tokio::test(flavor = "multi_thread")]
async fn two_agents_two_rounds_fedavg_matches_independent_computation() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let data_a = site_data(&project, "alpha", 0, 3);
    let data_b = site_data(&project, "beta", 1, 5);
    let _a = spawn_agent(&project, "alpha", &data_a);
    let _b = spawn_agent(&project, "beta", &data_b);
    let mut admin = admin(&project).await;
    let run = start_run(&mut admin, run_config(2, 2, 120), &tiny_model(1)).await;
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(240), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Completed);
    assert_eq!(run.rounds.len(), 2);

    let store = project.state().join("models");
    let round1 = &run.rounds[0].version;
    let round2 = &run.rounds[1].version;
    let base = read_weights(&store.join(format!("{round1}.safetensors")));
    let checkpoint_bytes = std::fs::read(store.join(format!("{round2}.safetensors"))).unwrap();
    let checkpoint = alveolus_models::Weights::decode(&checkpoint_bytes).unwrap();

    // What each agent sent in round 2, and with which weight.
    let mut updates = Vec::new();
    for site in ["alpha", "beta"] {
        let stem = project
            .path(&format!("audit-{site}"))
            .join(format!("{}-round0002", run.run_id));
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(stem.with_extension("json")).unwrap()).unwrap();
        assert_eq!(record["base_version"], round1.as_str());
        let samples = record["num_samples"].as_u64().unwrap();
        updates.push((
            read_weights(&stem.with_extension("safetensors")),
            samples as f64,
        ));
    }
    assert_eq!(updates[0].1, 3.0);
    assert_eq!(updates[1].1, 5.0);
    let total: f64 = updates.iter().map(|(_, n)| n).sum();
    let mut compared = 0;
    for (name, tensor) in &checkpoint.tensors {
        for (i, value) in tensor.values.iter().enumerate() {
            let mean: f64 = updates
                .iter()
                .map(|(u, n)| n * u.tensors[name].values[i] as f64)
                .sum::<f64>()
                / total;
            let expected = base.tensors[name].values[i] as f64 + mean;
            assert!(
                (*value as f64 - expected).abs() <= 1e-6,
                "{name}[{i}]: checkpoint {value}, FedAvg {expected}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, base.num_values());
    assert!(updates.iter().all(|(u, _)| {
        u.tensors
            .values()
            .any(|t| t.values.iter().any(|v| *v != 0.0))
    }));

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join(format!("{round2}.json"))).unwrap())
            .unwrap();
    assert_eq!(manifest["sha256"], sha256_hex(&checkpoint_bytes));
    assert_eq!(manifest["sha256"], round2.as_str());
    assert_eq!(manifest["parent"], round1.as_str());
    assert_eq!(manifest["round"], 2);
    assert_eq!(manifest["samples"], 8);
    assert_eq!(manifest["sites"], serde_json::json!(["alpha", "beta"]));
    // The model file carries the architecture, so anyone can load it.
    assert!(checkpoint.metadata.contains_key("alveolus.model"));
}

/// A site that takes the round's task and dies does not stall the run: once the deadline
/// passes, the round closes with the sites that reported.
#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_round_closes_after_deadline_with_the_others() {
    let project = project(&["alpha", "beta", "gamma"]);
    let _coordinator = start_coordinator(&project).await;
    // Gamma holds many slices, so its local training outlasts the others' by seconds.
    let mut agents = Vec::new();
    for (i, (site, slices)) in [("alpha", 2), ("beta", 2), ("gamma", 25)]
        .into_iter()
        .enumerate()
    {
        let data = site_data(&project, site, i, slices);
        agents.push(spawn_agent(&project, site, &data));
    }
    let mut admin = admin(&project).await;
    wait_for_sites(&mut admin, &["alpha", "beta", "gamma"]).await;
    let deadline = 8;
    let model =
        alveolus_models::network::initial_weights(&alveolus_models::ModelSpec::small(), 2).unwrap();
    let run = start_run(&mut admin, run_config(1, 2, deadline), &model).await;
    // Kill gamma as soon as it has taken the round's task.
    let gamma_log = project.path("gamma.log");
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&gamma_log)
        .unwrap_or_default()
        .contains("pulling global model")
    {
        assert!(
            std::time::Instant::now() < until,
            "gamma never took the task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut gamma = agents.pop().unwrap();
    gamma.0.kill().unwrap();
    gamma.0.wait().unwrap();

    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(120), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Completed);
    let round = &run.rounds[0];
    assert_eq!(round.sites, vec!["alpha".to_string(), "beta".to_string()]);
    let waited_ms = round.finished_unix_ms - run.started_unix_ms;
    assert!(
        waited_ms >= deadline as i64 * 1000,
        "round closed after {waited_ms} ms, before the {deadline} s deadline"
    );
}

/// A coordinator killed (SIGKILL) between rounds and restarted continues the run from its last
/// finished round; nothing finished is lost and the lineage stays intact.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_and_restarted_resumes_the_run() {
    let project = project(&["alpha", "beta"]);
    let mut coordinator = spawn_coordinator(&project);
    let data_a = site_data(&project, "alpha", 0, 4);
    let data_b = site_data(&project, "beta", 2, 4);
    let _a = spawn_agent(&project, "alpha", &data_a);
    let _b = spawn_agent(&project, "beta", &data_b);
    let mut admin = admin(&project).await;
    // The small network makes a round last long enough to stop the coordinator between rounds.
    let model =
        alveolus_models::network::initial_weights(&alveolus_models::ModelSpec::small(), 3).unwrap();
    let run = start_run(&mut admin, run_config(5, 2, 120), &model).await;
    let before = wait_for(&mut admin, &run.run_id, Duration::from_secs(240), |r| {
        r.rounds.len() >= 2
    })
    .await;
    assert_eq!(
        before.state,
        RunState::Running,
        "the run ended before the coordinator could be stopped"
    );

    coordinator.0.kill().unwrap();
    coordinator.0.wait().unwrap();
    drop(admin);
    let _coordinator = spawn_coordinator(&project);
    let mut admin = common::admin(&project).await;
    let after = wait_for(&mut admin, &run.run_id, Duration::from_secs(240), |r| {
        r.state != RunState::Running
    })
    .await;

    assert_eq!(after.state, RunState::Completed);
    assert_eq!(after.rounds.len(), 5);
    for (old, new) in before.rounds.iter().zip(&after.rounds) {
        assert_eq!(old, new, "a finished round changed across the restart");
    }
    let store = project.state().join("models");
    let mut parent = after.initial_version.clone();
    for round in &after.rounds {
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(store.join(format!("{}.json", round.version))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            manifest["parent"],
            parent.as_str(),
            "lineage broken at round {}",
            round.round
        );
        assert_eq!(manifest["round"], round.round);
        parent = round.version.clone();
    }
}
