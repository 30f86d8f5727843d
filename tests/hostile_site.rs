//! One authenticated site, buggy or hostile, costs at most its own contribution: numbers out of
//! their meaning, updates that would overflow the model, and forged log lines are refused at the
//! edge, and the run, its record and a restart go on. The tests play the site themselves, with
//! the site's real certificate, against a coordinator on a loopback port.

mod common;

use std::time::Duration;

use alveolus_proto::PROTOCOL_VERSION;
use alveolus_proto::client::pull_model_with_kit;
use alveolus_proto::domain::RunState;
use alveolus_proto::pb::{self, federation_client::FederationClient};
use alveolus_proto::weights::Weights;
use common::*;
use tonic::Code;

fn metrics(loss: f64) -> pb::Metrics {
    pb::Metrics { loss, dice: 0.5 }
}

#[tokio::test(flavor = "multi_thread")]
async fn numbers_out_of_their_meaning_are_refused_and_the_run_and_a_restart_go_on() {
    let project = project(&["alpha"]);
    let coordinator = start_coordinator(&project).await;
    let mut site = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let mut admin = admin(&project).await;
    let model = tiny_model(1);
    let run = start_run(&mut admin, run_config(1, 1, 600), &model).await;
    let task = join_and_take_task(&mut site, "test", 5).await;
    let update = constant_update(&model, 0.01);

    // A finite loss whose sample-weighted mean would overflow to infinity.
    let status = push_update_reporting(&mut site, &task, &update, 4, metrics(1.7e308))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("metrics.loss"), "{status:?}");
    // Sample counts whose sum would wrap around.
    for samples in [1u64 << 63, u64::MAX] {
        let status = push_update_reporting(&mut site, &task, &update, samples, metrics(0.5))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("num_samples"), "{status:?}");
    }

    // The same site, honest now, still completes the run.
    push_update_reporting(&mut site, &task, &update, 4, metrics(0.5))
        .await
        .unwrap();
    let info = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state == RunState::Completed
    })
    .await;
    assert_eq!(info.rounds[0].samples, 4);
    assert_eq!(info.rounds[0].loss, 0.5);

    // A restarted coordinator reads its own state back and serves the model.
    coordinator.stop().await;
    let _coordinator = start_coordinator(&project).await;
    let mut admin = common::admin(&project).await;
    let again = get_run(&mut admin, &run.run_id).await;
    assert_eq!(again.rounds, info.rounds);
    let (header, bytes) = pull_model_with_kit(&project.site_kit("alpha"), "")
        .await
        .unwrap();
    assert_eq!(header.version, info.rounds[0].version);
    Weights::decode(&bytes).unwrap().check_finite().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_that_would_overflow_the_model_are_refused_and_the_round_goes_on_without_them() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let mut alpha = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let mut beta = FederationClient::new(connect(&project.site_kit("beta")).await);
    let mut admin = admin(&project).await;
    let model = tiny_model(2);
    let run = start_run(&mut admin, run_config(2, 1, 600), &model).await;

    // Round 1: alpha alone, with values near f32's largest. Finite, so taken.
    let task = join_and_take_task(&mut alpha, "test", 5).await;
    push_update(&mut alpha, &task, &constant_update(&model, 3e38), 1)
        .await
        .unwrap();
    wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.rounds.len() == 1
    })
    .await;

    // Round 2: the same again would make every value infinite. It is refused, and the round
    // does not wait for alpha: beta's update closes it.
    let task = join_and_take_task(&mut alpha, "test", 5).await;
    assert_eq!(task.round, 2);
    let status = push_update(&mut alpha, &task, &constant_update(&model, 3e38), 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("the model this update makes"),
        "{status:?}"
    );
    let task = join_and_take_task(&mut beta, "test", 5).await;
    assert_eq!(task.round, 2);
    push_update(&mut beta, &task, &constant_update(&model, -1e38), 1)
        .await
        .unwrap();
    let info = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state == RunState::Completed
    })
    .await;
    assert_eq!(info.rounds[1].sites, vec!["beta".to_string()]);
    let (_, bytes) = pull_model_with_kit(&project.site_kit("beta"), "")
        .await
        .unwrap();
    Weights::decode(&bytes).unwrap().check_finite().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_version_cannot_forge_a_log_line() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;
    let mut site = FederationClient::new(connect(&project.site_kit("alpha")).await);
    for forged in [
        "1.0\n2026-11-28T00:00:00Z ERROR coordinator: forged".to_string(),
        "9".repeat(1 << 20),
    ] {
        let status = site
            .join(pb::JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                agent_version: forged,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("agent_version"), "{status:?}");
    }
}

/// Opens an upload for `task` that sends its header and then nothing, as a stalled or hostile
/// site would; the returned sender keeps the stream open.
fn stalled_upload(
    site: &FederationClient<tonic::transport::Channel>,
    task: &alveolus_proto::domain::TrainTask,
    model: &Weights,
) -> (
    tokio::sync::mpsc::Sender<pb::UpdateChunk>,
    tokio::task::JoinHandle<Result<tonic::Response<pb::PushUpdateResponse>, tonic::Status>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            run_id: task.run_id.clone(),
            round: task.round,
            base_version: task.model_version.clone(),
            num_samples: 4,
            metrics: Some(metrics(0.5)),
            total_bytes: constant_update(model, 0.0).encode().len() as u64,
            masked: false,
            train_seconds: 0.0,
        })),
    };
    tx.try_send(header).unwrap();
    let mut site = site.clone();
    let call = tokio::spawn(async move {
        site.push_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    (tx, call)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_site_cannot_take_every_upload_slot() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let mut alpha = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let mut beta = FederationClient::new(connect(&project.site_kit("beta")).await);
    let mut admin = admin(&project).await;
    let model = tiny_model(4);
    start_run(&mut admin, run_config(1, 2, 600), &model).await;
    let alpha_task = join_and_take_task(&mut alpha, "test", 5).await;
    let beta_task = join_and_take_task(&mut beta, "test", 5).await;

    // Alpha holds one of the two slots with an upload that never sends data; its second
    // upload is refused at once instead of taking the other.
    let (_keep, first) = stalled_upload(&alpha, &alpha_task, &model);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !first.is_finished(),
        "the stalled upload should still be open"
    );
    let (_keep2, second) = stalled_upload(&alpha, &alpha_task, &model);
    let status = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("a second upload from the same site must not wait")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // An honest site's upload goes through meanwhile.
    let pushed = tokio::time::timeout(
        Duration::from_secs(10),
        push_update(&mut beta, &beta_task, &constant_update(&model, 0.01), 4),
    )
    .await
    .expect("an honest upload waited behind a stalled one");
    pushed.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_an_upload_slot_ends_with_the_round_deadline() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator_with(&project, |s| s.upload_slots = 1).await;
    let mut alpha = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let mut beta = FederationClient::new(connect(&project.site_kit("beta")).await);
    let mut admin = admin(&project).await;
    let model = tiny_model(5);
    start_run(&mut admin, run_config(1, 1, 2), &model).await;
    let alpha_task = join_and_take_task(&mut alpha, "test", 5).await;
    let beta_task = join_and_take_task(&mut beta, "test", 5).await;

    let (_keep, _stalled) = stalled_upload(&alpha, &alpha_task, &model);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        push_update(&mut beta, &beta_task, &constant_update(&model, 0.01), 4),
    )
    .await
    .expect("the wait for a slot outlived the round's deadline by far");
    let status = waited.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("deadline"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_start_holds_one_slot_and_a_second_from_the_same_admin_is_refused() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;
    let admin = admin(&project).await;
    let model = tiny_model(7);
    let header = start_run_stream(run_config(1, 1, 600), &model);
    let header: Vec<pb::StartRunChunk> = futures::StreamExt::collect(header).await;
    let stalled = |admin: &pb::admin_client::AdminClient<tonic::transport::Channel>| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(header[0].clone()).unwrap();
        let mut admin = admin.clone();
        let call = tokio::spawn(async move {
            admin
                .start_run(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        (tx, call)
    };
    let (_keep, first) = stalled(&admin);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!first.is_finished());
    let (_keep2, second) = stalled(&admin);
    let status = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("a second start from the same admin must not wait")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_holds_at_most_two_long_polls() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let alpha = FederationClient::new(connect(&project.site_kit("alpha")).await);
    // No run: long polls wait their whole time.
    let polls: Vec<_> = (0..3)
        .map(|_| {
            let mut alpha = alpha.clone();
            tokio::spawn(async move {
                alpha
                    .next_task(pb::NextTaskRequest { wait_seconds: 3 })
                    .await
            })
        })
        .collect();
    let mut refused = 0;
    for poll in polls {
        if let Err(status) = poll.await.unwrap() {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 1);
    // Another site is not counted with alpha.
    let mut beta = FederationClient::new(connect(&project.site_kit("beta")).await);
    beta.next_task(pb::NextTaskRequest { wait_seconds: 0 })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_holds_at_most_eight_connections() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let kit = project.site_kit("alpha");
    let poll = |mut site: FederationClient<_>| async move {
        site.next_task(pb::NextTaskRequest { wait_seconds: 0 })
            .await
            .map(|_| site)
    };
    let mut open = Vec::new();
    for _ in 0..8 {
        let site = FederationClient::new(connect(&kit).await);
        open.push(poll(site).await.unwrap());
    }
    // The ninth is closed once its certificate is read: no call gets through on it.
    let ninth = FederationClient::new(connect(&kit).await);
    assert!(poll(ninth).await.is_err());
    // Another site is not counted with alpha.
    let beta = FederationClient::new(connect(&project.site_kit("beta")).await);
    poll(beta).await.unwrap();
    // A closed connection frees its place (the coordinator sees the close a moment later).
    open.pop();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let site = FederationClient::new(connect(&kit).await);
        match poll(site).await {
            Ok(site) => break open.push(site),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(status) => panic!("no connection after one closed: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_carries_at_most_sixteen_streams() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;
    let mut admin = admin(&project).await;
    let run = start_run(&mut admin, run_config(1, 1, 600), &tiny_model(4)).await;
    let watch = |mut admin: pb::admin_client::AdminClient<_>, run_id: String| async move {
        let mut events = admin
            .watch_run(pb::GetRunRequest { run_id })
            .await?
            .into_inner();
        events.message().await.map(|_| events)
    };
    // Watching a running run holds a stream open until the run ends.
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(watch(admin.clone(), run.run_id.clone()).await.unwrap());
    }
    // A seventeenth on the same connection waits for one of them to close.
    let seventeenth = tokio::spawn(watch(admin.clone(), run.run_id.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !seventeenth.is_finished(),
        "a seventeenth stream was opened"
    );
    open.pop();
    tokio::time::timeout(Duration::from_secs(10), seventeenth)
        .await
        .expect("a closed stream frees its place")
        .unwrap()
        .unwrap();
}
