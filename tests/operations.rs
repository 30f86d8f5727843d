//! What hospital IT runs the services with: the gRPC health check that probes and
//! `alveolus health` make, and logs in JSON for log shippers.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `alveolus health` with a site's kit and an admin's: SERVING for the coordinator and each of
/// its services, an error for a service it does not have, and a failure once it is stopped.
#[tokio::test(flavor = "multi_thread")]
async fn health_is_serving_while_the_coordinator_runs_and_fails_once_it_stops() {
    let project = project(&["alpha"]);
    let coordinator = start_coordinator(&project).await;
    let site = project.site_kit("alpha");
    let site = site.to_str().unwrap();
    let admin = project.admin_kit();
    let admin = admin.to_str().unwrap();
    let address = format!("127.0.0.1:{}", project.port);

    let (ok, text) = cli(&["health", "--kit", site], &[]).await;
    assert!(ok, "{text}");
    assert!(
        text.starts_with(&format!("the coordinator at {address}: SERVING (")),
        "{text}"
    );
    for service in ["alveolus.v1.Federation", "alveolus.v1.Admin"] {
        let (ok, text) = cli(&["health", "--kit", admin, "--service", service], &[]).await;
        assert!(
            ok && text.contains(&format!("{service} at {address}: SERVING")),
            "{text}"
        );
    }
    let (ok, text) = cli(
        &["health", "--kit", site, "--service", "alveolus.v1.Nothing"],
        &[],
    )
    .await;
    assert!(!ok && text.contains("NotFound"), "{text}");

    coordinator.stop().await;
    let (ok, text) = cli(&["health", "--kit", site], &[]).await;
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("cannot connect to the coordinator at {address}")),
        "{text}"
    );
}

/// `--log-format json`: every line a coordinator writes is one JSON object with its level,
/// message and fields at the top level, as log shippers index them.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let project = project(&["alpha"]);
    let coordinator = spawn_coordinator_with(
        &project,
        project.port,
        "coordinator.log",
        &["--log-format", "json"],
    );
    let log = project.path("coordinator.log");
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("coordinator listening")
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A join, so that the log holds more than the start.
    let kit = project.site_kit("alpha");
    let (ok, text) = cli(&["health", "--kit", kit.to_str().unwrap()], &[]).await;
    assert!(ok, "{text}");
    drop(coordinator);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut messages = Vec::new();
    for line in text.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(object["timestamp"].is_string(), "{line}");
        assert!(object["level"].is_string(), "{line}");
        messages.push(object);
    }
    let start = messages
        .iter()
        .find(|m| m["message"] == "coordinator listening")
        .expect("the start is logged");
    assert_eq!(start["level"], "INFO");
    assert_eq!(start["address"], format!("127.0.0.1:{}", project.port));
    assert_eq!(start["project"], "lungs");
}

/// The systemd units and container files in deploy/ pass `systemd-analyze verify` and its
/// security score, and pass the binary only commands and flags it has (scripts/check-deploy,
/// which also proves it catches a misspelled directive).
#[test]
fn the_deploy_files_verify_against_systemd_and_this_binary() {
    let text = run_script("check-deploy", &[BIN]);
    assert!(text.contains("check-deploy: all checks passed"), "{text}");
}

/// The runtime image around this binary, under podman: a coordinator and an agent in
/// containers over mTLS, no kit named clearly, and the systemd units under a real systemd as
/// PID 1 training a round (scripts/check-container --systemd). Slow the first time (Debian
/// bases made with debootstrap) and needs root, so it runs with ALVEOLUS_SLOW_TESTS=1, as CI
/// does.
#[test]
fn the_container_image_and_the_units_run_a_federation() {
    if std::env::var_os("ALVEOLUS_SLOW_TESTS").is_none() {
        eprintln!(
            "skipped: set ALVEOLUS_SLOW_TESTS=1 (and run as root) to build and run the image"
        );
        return;
    }
    let text = run_script("check-container", &["--systemd", BIN]);
    assert!(
        text.contains("check-container: all checks passed"),
        "{text}"
    );
}
