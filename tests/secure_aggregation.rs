//! Secure aggregation end to end over mTLS with the sites' real certificates; the test plays
//! the sites with the agent's own protocol code, so it sees exactly the bytes the coordinator
//! receives from each site.

mod common;

use std::time::Duration;

use alveolus_agent::secure;
use alveolus_agent::transport::{Traffic, push_update as push_masked_update};
use alveolus_models::Weights;
use alveolus_privacy::wire::{Request, Step};
use alveolus_proto::domain::{Metrics, RunConfig, RunState, SecureAggregationConfig, TrainTask};
use alveolus_proto::pb::{self, federation_client::FederationClient};
use common::*;
use tonic::Code;
use tonic::transport::Channel;

const SITES: [&str; 5] = ["alpha", "beta", "gamma", "delta", "kappa"];

async fn site(project: &Project, name: &str) -> FederationClient<Channel> {
    FederationClient::new(connect(&project.site_kit(name)).await)
}

fn secure_config(rounds: u32, threshold: u32, deadline: u32) -> RunConfig {
    RunConfig {
        secure_aggregation: Some(SecureAggregationConfig { threshold }),
        ..run_config(rounds, threshold, deadline)
    }
}

/// A different update per site, with values of both signs.
fn site_update(model: &Weights, site: usize) -> Weights {
    let mut update = constant_update(model, 0.0);
    for (i, v) in update
        .tensors
        .values_mut()
        .flat_map(|t| t.values.iter_mut())
        .enumerate()
    {
        *v = ((i * 7 + site * 13) as f32).sin() * 0.05;
    }
    update
}

/// The words a site would send without masking.
fn plain_words(update: &Weights, samples: u64) -> Vec<u64> {
    let values = update
        .tensors
        .values()
        .flat_map(|t| t.values.iter().copied());
    let metrics = Metrics {
        loss: 0.5,
        dice: 0.25,
    };
    alveolus_privacy::secagg::quantize_update(values, metrics, samples).0
}

/// How far a site goes in the round.
#[derive(Clone, Copy, PartialEq)]
enum Fate {
    /// Sends keys and shares, then vanishes before its masked update.
    DropsBeforeMasking,
    /// Sends its masked update, then vanishes before revealing shares.
    DropsAfterMasking,
    Completes,
}

/// Plays one site through a secure round; returns the masked words it sent, if any.
async fn play(
    mut client: FederationClient<Channel>,
    task: TrainTask,
    name: &'static str,
    update: Weights,
    samples: u64,
    fate: Fate,
) -> Option<Vec<u64>> {
    let session = secure::join_round(&mut client, &task, name, &mut Traffic::default())
        .await
        .unwrap();
    if fate == Fate::DropsBeforeMasking {
        return None;
    }
    let metrics = Metrics {
        loss: 0.5,
        dice: 0.25,
    };
    let words = secure::mask_update(&session, &update, metrics, samples, None).unwrap();
    let (header, bytes) = secure::masked_message(&task, &words);
    push_masked_update(&mut client, header, &bytes, &mut Traffic::default())
        .await
        .unwrap();
    if fate == Fate::Completes {
        secure::reveal(&mut client, &task, &session, &mut Traffic::default())
            .await
            .unwrap();
    }
    Some(words)
}

async fn join_all(project: &Project) -> Vec<(FederationClient<Channel>, TrainTask)> {
    let mut sites = Vec::new();
    for name in SITES {
        let mut client = site(project, name).await;
        let task = join_and_take_task(&mut client, "t", 10).await;
        sites.push((client, task));
    }
    sites
}

#[tokio::test(flavor = "multi_thread")]
async fn five_sites_with_two_dropouts_give_fedavg_and_no_site_is_seen() {
    let project = project(&SITES);
    let _coordinator = start_coordinator(&project).await;
    let model = tiny_model(5);
    let mut admin = admin(&project).await;
    let run = start_run(&mut admin, secure_config(1, 3, 6), &model).await;
    let fates = [
        Fate::Completes,
        Fate::Completes,
        Fate::Completes,
        Fate::DropsAfterMasking,
        Fate::DropsBeforeMasking,
    ];
    let samples = [3u64, 5, 7, 11, 13];
    let mut playing = Vec::new();
    for (i, (client, task)) in join_all(&project).await.into_iter().enumerate() {
        assert_eq!(task.secure_aggregation.unwrap().threshold, 3);
        playing.push(tokio::spawn(play(
            client,
            task,
            SITES[i],
            site_update(&model, i),
            samples[i],
            fates[i],
        )));
    }
    let mut sent = Vec::new();
    for p in playing {
        sent.push(p.await.unwrap());
    }
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(60), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Completed, "{:?}", run.stop_reason);
    let round = &run.rounds[0];
    // The site that dropped after masking is counted; the one that dropped before is not.
    assert_eq!(round.sites, vec!["alpha", "beta", "delta", "gamma"]);
    assert_eq!(round.samples, 3 + 5 + 7 + 11);
    assert!((round.loss - 0.5).abs() < 1e-6 && (round.dice - 0.25).abs() < 1e-6);

    // The unmasked mean equals plain FedAvg of the four survivors within the quantization.
    let merged = read_weights(
        &project
            .state()
            .join("models")
            .join(format!("{}.safetensors", round.version)),
    );
    let survivors = [0usize, 1, 2, 3];
    let total: f64 = survivors.iter().map(|&i| samples[i] as f64).sum();
    let updates: Vec<Weights> = survivors.iter().map(|&i| site_update(&model, i)).collect();
    let mut worst = 0f64;
    for (name, tensor) in &merged.tensors {
        for (j, v) in tensor.values.iter().enumerate() {
            let mean: f64 = survivors
                .iter()
                .zip(&updates)
                .map(|(&i, u)| samples[i] as f64 * u.tensors[name].values[j] as f64)
                .sum::<f64>()
                / total;
            let expected = model.tensors[name].values[j] as f64 + mean;
            worst = worst.max((*v as f64 - expected).abs());
        }
    }
    assert!(worst < 1e-6, "largest difference from FedAvg: {worst}");

    // What reached the coordinator from each site is not its update, and looks uniform.
    for (i, words) in sent.iter().enumerate() {
        let Some(words) = words else { continue };
        let plain = plain_words(&site_update(&model, i), samples[i]);
        let equal = words.iter().zip(&plain).filter(|(a, b)| a == b).count();
        assert!(
            equal * 1000 < words.len(),
            "site {i}: {equal} words unmasked"
        );
        let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
        let fraction = ones as f64 / (64.0 * words.len() as f64);
        assert!(
            (fraction - 0.5).abs() < 0.01,
            "site {i}: bit fraction {fraction}"
        );
    }
    // The checkpoint says how it was made.
    let manifest = std::fs::read_to_string(
        project
            .state()
            .join("models")
            .join(format!("{}.json", round.version)),
    )
    .unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["samples"], 26, "{manifest}");
    assert_eq!(manifest["secure_aggregation"]["threshold"], 3, "{manifest}");
}

#[tokio::test(flavor = "multi_thread")]
async fn too_few_survivors_fail_the_round_and_reveal_nothing() {
    let project = project(&SITES);
    let _coordinator = start_coordinator(&project).await;
    let model = tiny_model(5);
    let mut admin = admin(&project).await;
    let run = start_run(&mut admin, secure_config(2, 4, 4), &model).await;
    let fates = [
        Fate::Completes,
        Fate::Completes,
        Fate::Completes,
        Fate::DropsBeforeMasking,
        Fate::DropsBeforeMasking,
    ];
    let mut playing = Vec::new();
    for (i, (mut client, task)) in join_all(&project).await.into_iter().enumerate() {
        let update = site_update(&model, i);
        let fate = fates[i];
        playing.push(tokio::spawn(async move {
            let session = secure::join_round(&mut client, &task, SITES[i], &mut Traffic::default())
                .await
                .unwrap();
            if fate == Fate::DropsBeforeMasking {
                return None;
            }
            let words =
                secure::mask_update(&session, &update, Metrics::default(), 1, None).unwrap();
            let (header, bytes) = secure::masked_message(&task, &words);
            push_masked_update(&mut client, header, &bytes, &mut Traffic::default())
                .await
                .unwrap();
            // The coordinator never names the survivors: there is nothing to reveal for.
            Some(
                secure::reveal(&mut client, &task, &session, &mut Traffic::default())
                    .await
                    .unwrap_err(),
            )
        }));
    }
    for p in playing {
        if let Some(error) = p.await.unwrap() {
            let secure::SecureError::Status(status) = error else {
                panic!("expected a refusal, got {error}")
            };
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        }
    }
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Failed);
    assert!(
        run.rounds.is_empty(),
        "no model came out of the failed round"
    );
    let reason = run.stop_reason.unwrap();
    assert!(
        reason.contains("only 3 of 5 sites sent a masked update")
            && reason.contains("threshold 4")
            && reason.contains("nothing was revealed"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn misaddressed_shares_replayed_and_unmasked_updates_are_refused() {
    let names = &SITES[..3];
    let project = project(names);
    let _coordinator = start_coordinator(&project).await;
    let model = tiny_model(5);
    let mut admin = admin(&project).await;
    let run = start_run(&mut admin, secure_config(2, 2, 30), &model).await;
    let mut sites = Vec::new();
    for name in names {
        let mut client = site(&project, name).await;
        let task = join_and_take_task(&mut client, "t", 10).await;
        sites.push((client, task));
    }
    // A plain update has no place in a securely aggregated round.
    let (client, task) = &mut sites[0];
    let status = push_update(client, task, &site_update(&model, 0), 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("only a masked update"),
        "{}",
        status.message()
    );

    // Round 1, with alpha sending a share addressed to a site not on the roster first.
    let mut playing = Vec::new();
    for (i, (mut client, task)) in sites.into_iter().enumerate() {
        let update = site_update(&model, i);
        playing.push(tokio::spawn(async move {
            let name = names[i];
            if i == 0 {
                let refused = misaddressed_shares(&mut client, &task, name).await;
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                assert!(
                    refused.message().contains("addressed to `mallory`"),
                    "{}",
                    refused.message()
                );
            }
            let session =
                secure::join_round(&mut client, &task, name, &mut Traffic::default()).await;
            if i == 0 {
                // A site that already sent keys is not handed the round again.
                let next = client
                    .next_task(pb::NextTaskRequest { wait_seconds: 1 })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(matches!(
                    alveolus_proto::domain::Task::try_from(next).unwrap(),
                    alveolus_proto::domain::Task::Wait { .. }
                ));
            }
            (client, task, session.map(|s| (s, update)))
        }));
    }
    let mut round_one = Vec::new();
    for p in playing {
        round_one.push(p.await.unwrap());
    }
    // alpha's second key message (after its misaddressed shares) is refused: keys are per site
    // and round. Beta and gamma go on, as a round of two.
    let mut replay = None;
    let mut masking = Vec::new();
    for (mut client, task, session) in round_one {
        let Ok((session, update)) = session else {
            continue;
        };
        masking.push(tokio::spawn(async move {
            let words =
                secure::mask_update(&session, &update, Metrics::default(), 1, None).unwrap();
            let (header, bytes) = secure::masked_message(&task, &words);
            push_masked_update(&mut client, header.clone(), &bytes, &mut Traffic::default())
                .await
                .unwrap();
            secure::reveal(&mut client, &task, &session, &mut Traffic::default())
                .await
                .unwrap();
            (client, header, bytes)
        }));
    }
    for m in masking {
        replay = Some(m.await.unwrap());
    }
    let info = wait_for(&mut admin, &run.run_id, Duration::from_secs(60), |r| {
        !r.rounds.is_empty()
    })
    .await;
    assert_eq!(info.rounds[0].sites.len(), 2);
    // The masked update of round 1, sent again in round 2, is refused.
    let (mut client, header, bytes) = replay.unwrap();
    let status = push_masked_update(&mut client, header, &bytes, &mut Traffic::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("round 1") && status.message().contains("round 2"),
        "{}",
        status.message()
    );
}

/// Sends keys, then, once the roster is in, shares of which one is addressed to `mallory`;
/// returns the coordinator's refusal.
async fn misaddressed_shares(
    client: &mut FederationClient<Channel>,
    task: &TrainTask,
    name: &str,
) -> tonic::Status {
    let context = alveolus_privacy::secagg::RoundContext {
        run_id: task.run_id.clone(),
        round: task.round,
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    let mut session = alveolus_privacy::secagg::SiteSession::new(context, name, &mut rng);
    let request = |step| -> pb::SecAggRequest {
        Request {
            run_id: task.run_id.clone(),
            round: task.round,
            wait_seconds: 20,
            step,
        }
        .into()
    };
    let reply = client
        .secure_aggregation(request(Step::Keys(session.public_keys())))
        .await
        .unwrap()
        .into_inner();
    let alveolus_privacy::wire::Reply::Roster(roster) = reply.try_into().unwrap() else {
        panic!("expected the roster")
    };
    let mut shares = session.share_keys(roster, &mut rng).unwrap();
    shares.envelopes[0].to = "mallory".into();
    client
        .secure_aggregation(request(Step::Shares(shares)))
        .await
        .unwrap_err()
}
