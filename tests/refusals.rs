//! Bad updates are refused with a clear status and leave the aggregate untouched. The test plays
//! a site itself, with that site's real certificate.

mod common;

use std::time::Duration;

use alveolus_proto::domain::RunState;
use alveolus_proto::pb::{self, federation_client::FederationClient};
use alveolus_proto::transfer::{chunks, digest};
use common::*;
use tonic::Code;
use tonic::transport::Channel;

/// Pushes `bytes` with their true digest, expecting a refusal.
async fn refused(
    client: &mut FederationClient<Channel>,
    p: &Push<'_>,
    bytes: &[u8],
) -> tonic::Status {
    push(client, p, bytes, digest(bytes)).await.unwrap_err()
}

struct Push<'a> {
    run_id: &'a str,
    round: u32,
    base: &'a str,
    samples: u64,
}

async fn push(
    client: &mut FederationClient<Channel>,
    p: &Push<'_>,
    bytes: &[u8],
    claimed_sha: Vec<u8>,
) -> Result<u32, tonic::Status> {
    use pb::update_chunk::Part;
    let payload = bytes::Bytes::copy_from_slice(bytes);
    let mut parts = vec![Part::Header(pb::UpdateHeader {
        run_id: p.run_id.into(),
        round: p.round,
        base_version: p.base.into(),
        num_samples: p.samples,
        metrics: Some(pb::Metrics {
            loss: 0.5,
            dice: 0.5,
        }),
        total_bytes: payload.len() as u64,
        masked: false,
        train_seconds: 0.0,
    })];
    parts.extend(chunks(&payload).map(Part::Data));
    parts.push(Part::Trailer(pb::TransferTrailer {
        sha256: claimed_sha.into(),
    }));
    let stream =
        futures::stream::iter(parts.into_iter().map(|p| pb::UpdateChunk { part: Some(p) }));
    client
        .push_update(stream)
        .await
        .map(|r| r.into_inner().reports_this_round)
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_stale_and_non_finite_updates_are_refused_and_change_nothing() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;
    let mut site = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let mut admin = admin(&project).await;
    let model = tiny_model(5);
    let run = start_run(&mut admin, run_config(1, 1, 600), &model).await;

    let task = join_and_take_task(&mut site, "test", 5).await;
    assert_eq!(task.round, 1);
    let good = Push {
        run_id: &run.run_id,
        round: 1,
        base: &task.model_version,
        samples: 4,
    };

    // A chunk corrupted in transit: the trailer's digest does not match the data.
    let bytes = constant_update(&model, 100.0).encode();
    let mut corrupted = bytes.to_vec();
    corrupted[bytes.len() / 2] ^= 0xff;
    let status = push(&mut site, &good, &corrupted, digest(&bytes))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("digest"), "{}", status.message());

    // An update for another round.
    let stale = Push { round: 2, ..good };
    let status = refused(&mut site, &stale, &bytes).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("round 2"), "{}", status.message());

    // An update for another run.
    let status = refused(
        &mut site,
        &Push {
            run_id: "run-0",
            ..good
        },
        &bytes,
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("run-0"), "{}", status.message());

    // An update computed from another model version.
    let other = "ab".repeat(32);
    let status = refused(
        &mut site,
        &Push {
            base: &other,
            ..good
        },
        &bytes,
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // A NaN in one tensor.
    let mut nan = constant_update(&model, 100.0);
    nan.tensors.values_mut().next().unwrap().values[0] = f32::NAN;
    let nan = nan.encode();
    let status = refused(&mut site, &good, &nan).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("non-finite"),
        "{}",
        status.message()
    );

    // Wrong tensor names or shapes.
    let mut reshaped = constant_update(&model, 100.0);
    let first = reshaped.tensors.values_mut().next().unwrap();
    first.shape = vec![first.values.len()];
    let reshaped = reshaped.encode();
    let status = refused(&mut site, &good, &reshaped).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut renamed = constant_update(&model, 100.0);
    let (name, tensor) = renamed.tensors.pop_first().unwrap();
    renamed.tensors.insert(format!("{name}.evil"), tensor);
    let renamed = renamed.encode();
    let status = refused(&mut site, &good, &renamed).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // An update announcing far more bytes than the model has, before sending any.
    let huge = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            run_id: run.run_id.clone(),
            round: 1,
            base_version: task.model_version.clone(),
            num_samples: 4,
            metrics: Some(pb::Metrics {
                loss: 0.5,
                dice: 0.5,
            }),
            total_bytes: 8 << 30,
            masked: false,
            train_seconds: 0.0,
        })),
    };
    let status = site
        .push_update(futures::stream::iter(vec![huge]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("more than"),
        "{}",
        status.message()
    );

    // Nothing of the above reached the aggregate: after one good update of 0.25 everywhere, the
    // round's model is exactly the initial one plus 0.25.
    let update = constant_update(&model, 0.25).encode();
    assert_eq!(
        push(&mut site, &good, &update, digest(&update))
            .await
            .unwrap(),
        1
    );
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state != RunState::Running
    })
    .await;
    let checkpoint = read_weights(
        &project
            .state()
            .join("models")
            .join(format!("{}.safetensors", run.rounds[0].version)),
    );
    for (name, tensor) in &checkpoint.tensors {
        for (value, initial) in tensor.values.iter().zip(&model.tensors[name].values) {
            assert!(
                (value - (initial + 0.25)).abs() <= 1e-6,
                "{name}: {value} vs {initial} + 0.25"
            );
        }
    }

    // The site cannot report twice.
    let status = refused(&mut site, &good, &update).await;
    assert!(
        matches!(
            status.code(),
            Code::FailedPrecondition | Code::AlreadyExists
        ),
        "{status:?}"
    );
}
