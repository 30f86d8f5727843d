//! A coordinator of today serves the state folder a release before it wrote (format 0: files
//! without a format tag), and writes its own files beside them in the current format.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alveolus_proto::domain::RunState;
use alveolus_proto::pb;
use alveolus_proto::sha256_hex;
use common::*;

const COMPLETED: &str = "run-1795890159160";
const ABORTED: &str = "run-1795890179718";
const ROUND_ONE: &str = "bba570d80f9b9d2a80217c98c73b8672962a86a848bfc84ee79f5a52f67d726f";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn todays_coordinator_serves_a_format_0_state_folder() {
    let project = project(&["hospital-a"]);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v0");
    copy_dir(&fixture, &project.state());
    let coordinator = start_coordinator(&project).await;
    let mut client = admin(&project).await;

    let runs = client
        .list_runs(pb::ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    let states: Vec<(String, i32)> = runs.iter().map(|r| (r.run_id.clone(), r.state)).collect();
    assert_eq!(states.len(), 2, "{states:?}");
    let completed = get_run(&mut client, COMPLETED).await;
    assert_eq!(completed.state, RunState::Completed);
    assert_eq!(completed.rounds.len(), 1);
    assert_eq!(completed.rounds[0].version, ROUND_ONE);
    assert_eq!(completed.rounds[0].sites, vec!["hospital-a"]);
    let aborted = get_run(&mut client, ABORTED).await;
    assert_eq!(aborted.state, RunState::Aborted);
    assert_eq!(aborted.config.privacy.unwrap().noise_multiplier, 1.1);

    // The old checkpoint is served, digest-checked, with its manifest.
    let out = project.path("pulled.safetensors");
    let output = Command::new(BIN)
        .args(["model", "pull", "--kit"])
        .arg(project.admin_kit())
        .args(["--version", ROUND_ONE, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), ROUND_ONE);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(manifest["round"], 1);
    assert_eq!(manifest["run_id"], COMPLETED);

    // A new run goes next to them, in the current format; a restart reads both.
    let run = start_run(&mut client, run_config(1, 1, 60), &tiny_model(5)).await;
    drop(client);
    drop(coordinator);
    // The first coordinator lets go of its port before the second takes it.
    let started = std::time::Instant::now();
    while std::net::TcpListener::bind(("127.0.0.1", project.port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the port stays taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = std::fs::read_to_string(
        project
            .state()
            .join("runs")
            .join(format!("{}.json", run.run_id)),
    )
    .unwrap();
    assert!(written.contains(r#""format": "1""#), "{written}");
    let _coordinator = start_coordinator(&project).await;
    let mut admin = admin(&project).await;
    assert_eq!(
        get_run(&mut admin, &run.run_id).await.state,
        RunState::Running
    );
    assert_eq!(
        get_run(&mut admin, COMPLETED).await.rounds[0].version,
        ROUND_ONE
    );
}
