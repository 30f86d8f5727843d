//! The coordinator's memory grows with the model, not with the number of sites: going from three
//! to twelve sites pushing updates of a 7.8 MB model at once raises the peak by far less than the
//! nine more updates would take if they were held. What remains per site is the HTTP/2
//! flow-control window of its waiting upload, bounded whatever the model size.

mod common;

use std::time::Duration;

use alveolus_models::{ModelSpec, Weights};
use alveolus_proto::domain::RunState;
use alveolus_proto::pb::federation_client::FederationClient;
use common::*;

/// (current, peak) resident memory of a process, in bytes (Linux).
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn push_constant_update(project: &Project, site: &str, model: &Weights) {
    let mut client = FederationClient::new(connect(&project.site_kit(site)).await);
    let task = join_and_take_task(&mut client, "memory-test", 10).await;
    push_update(&mut client, &task, &constant_update(model, 0.001), 1)
        .await
        .unwrap();
}

/// Runs one round in which `sites` push at once; returns the coordinator's peak memory after it.
async fn round_with(project: &Project, pid: u32, sites: &[&str], model: &Weights) -> u64 {
    let mut admin = admin(project).await;
    let run = start_run(&mut admin, run_config(1, sites.len() as u32, 600), model).await;
    let pushes: Vec<_> = sites
        .iter()
        .map(|site| push_constant_update(project, site, model))
        .collect();
    futures::future::join_all(pushes).await;
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(60), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.rounds[0].sites.len(), sites.len());
    rss(pid).1
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_memory_is_bounded_by_the_model_not_the_number_of_sites() {
    let sites: Vec<String> = (0..12).map(|i| format!("site-{i:02}")).collect();
    let names: Vec<&str> = sites.iter().map(String::as_str).collect();
    let project = project(&names);
    let coordinator = spawn_coordinator(&project);
    let pid = coordinator.0.id();
    let model = alveolus_models::network::initial_weights(&ModelSpec::default_2d(), 1).unwrap();
    let model_bytes = model.encode().len() as u64;
    // Wait until the coordinator is up, then take its resting size.
    admin(&project).await;
    let (idle, _) = rss(pid);

    let peak_3 = round_with(&project, pid, &names[..3], &model).await;
    let peak_12 = round_with(&project, pid, &names, &model).await;
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "model {:.1} MiB; coordinator idle {:.1} MiB, peak with 3 sites {:.1} MiB ({:.1} models above idle), with 12 sites {:.1} MiB",
        mib(model_bytes),
        mib(idle),
        mib(peak_3),
        (peak_3 - idle) as f64 / model_bytes as f64,
        mib(peak_12),
    );
    // Had each site's update been held, nine more sites would have added nine models.
    assert!(
        peak_12 < peak_3 + 9 * model_bytes / 2,
        "peak grew from {peak_3} to {peak_12} bytes going from 3 to 12 sites (model: {model_bytes} bytes)"
    );
}
