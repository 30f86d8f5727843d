//! A coordinator starts on a damaged state folder: what does not read is quarantined and said
//! so, and a run whose newest checkpoint is damaged goes on from the last one that reads.

mod common;

use std::time::Duration;

use alveolus_proto::domain::RunState;
use alveolus_proto::pb::federation_client::FederationClient;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_state_folder_is_quarantined_and_the_run_goes_on_from_its_last_good_model() {
    let project = project(&["alpha"]);
    let coordinator = start_coordinator(&project).await;
    let mut site = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let mut admin = admin(&project).await;
    let model = tiny_model(6);
    let run = start_run(&mut admin, run_config(3, 1, 600), &model).await;
    for round in 1..=2 {
        let task = join_and_take_task(&mut site, "test", 5).await;
        assert_eq!(task.round, round);
        push_update(&mut site, &task, &constant_update(&model, 0.01), 4)
            .await
            .unwrap();
        wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
            r.rounds.len() == round as usize
        })
        .await;
    }
    let before = get_run(&mut admin, &run.run_id).await;
    coordinator.stop().await;

    // Round 2's checkpoint damaged on disk, a stray and an empty file among the run logs, an
    // empty site list.
    let state = project.state();
    let newest = state
        .join("models")
        .join(format!("{}.safetensors", before.rounds[1].version));
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&newest, bytes).unwrap();
    std::fs::write(state.join("runs").join("notes.json"), "written by hand").unwrap();
    std::fs::write(state.join("runs").join("empty.json"), "").unwrap();
    std::fs::write(state.join("sites.json"), "").unwrap();

    let _coordinator = start_coordinator(&project).await;
    let mut admin = common::admin(&project).await;
    let resumed = get_run(&mut admin, &run.run_id).await;
    assert_eq!(resumed.state, RunState::Running);
    assert_eq!(resumed.rounds, before.rounds[..1]);
    let quarantined: Vec<String> = std::fs::read_dir(state.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in ["notes.json", "empty.json", "sites.json"] {
        assert!(
            quarantined.iter().any(|q| q.ends_with(name)),
            "{name} not in {quarantined:?}"
        );
    }

    // Round 2 again, from round 1's model; the run then completes.
    let mut site = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let task = join_and_take_task(&mut site, "test", 5).await;
    assert_eq!(
        (task.round, &task.model_version),
        (2, &before.rounds[0].version)
    );
    push_update(&mut site, &task, &constant_update(&model, 0.02), 4)
        .await
        .unwrap();
    let task = join_and_take_task(&mut site, "test", 5).await;
    assert_eq!(task.round, 3);
    push_update(&mut site, &task, &constant_update(&model, 0.02), 4)
        .await
        .unwrap();
    let done = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state == RunState::Completed
    })
    .await;
    assert_eq!(done.rounds.len(), 3);
    assert_eq!(done.rounds[0], before.rounds[0]);
}
