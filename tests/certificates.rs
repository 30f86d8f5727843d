//! Certificates over a project's life, through the binary: renewing a site's and the
//! coordinator's, adding an admin, and what cannot be renewed or added. Real certificates from
//! `provision`, a real coordinator.

mod common;

use std::time::{Duration, Instant};

use alveolus_proto::domain::RunState;
use common::*;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A site renewed in place keeps training, beside a site added later: its running agent takes
/// the renewed certificate when the old one is revoked, and copies of its old kit work until
/// then, and not after.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_site_and_an_added_one_train_and_the_old_kit_stops_once_revoked() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let root = project.root.to_str().unwrap().to_string();
    let kit = project.site_kit("alpha");
    let old = project.path("alpha-old-kit");
    copy_dir(&kit, &old);
    let read = |name: &str| std::fs::read(kit.join(name)).unwrap();
    let (cert0, key0) = (read("cert.pem"), read("key.pem"));
    // The agents run throughout, from the kit folders that are renewed under them.
    let data_a = site_data(&project, "alpha", 0, 3);
    let data_b = site_data(&project, "beta", 1, 3);
    let _a = spawn_agent(&project, "alpha", &data_a);
    let _b = spawn_agent(&project, "beta", &data_b);
    let mut admin = admin(&project).await;
    wait_for_sites(&mut admin, &["alpha", "beta"]).await;

    let (ok, text) = cli(&["renew", "--project-dir", &root, "--site", "alpha"], &[]).await;
    assert!(ok && text.contains("site/alpha: new certificate"), "{text}");
    assert_ne!(read("cert.pem"), cert0);
    assert_eq!(read("key.pem"), key0, "the key is kept unless --new-key");
    for kit in [&kit, &old] {
        let (ok, text) = cli(&["health", "--kit", kit.to_str().unwrap()], &[]).await;
        assert!(ok && text.contains("SERVING"), "{text}");
    }

    let (ok, text) = cli(
        &[
            "renew",
            "--project-dir",
            &root,
            "--site",
            "alpha",
            "--new-key",
            "--revoke-previous",
        ],
        &[],
    )
    .await;
    assert!(ok && text.contains("revocation list written"), "{text}");
    assert_ne!(read("key.pem"), key0);
    let (ok, text) = cli(&["health", "--kit", old.to_str().unwrap()], &[]).await;
    assert!(!ok, "the old certificate still gets in: {text}");
    // The running agent is refused at its next call with the revoked certificate, takes the
    // renewed one from its kit folder and reconnects, without a restart.
    let log = project.path("alpha.log");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("kit reloaded: using its new certificate")
    {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A hospital that joins later, while the coordinator runs.
    let (ok, text) = cli(
        &["provision", "--project-dir", &root, "--add-site", "gamma"],
        &[],
    )
    .await;
    assert!(ok && text.contains("roster.toml"), "{text}");

    // The renewed site, an untouched one and the new one train in the next run together.
    let data_c = site_data(&project, "gamma", 2, 3);
    let _c = spawn_agent(&project, "gamma", &data_c);
    wait_for_sites(&mut admin, &["alpha", "beta", "gamma"]).await;
    let run = start_run(&mut admin, run_config(1, 3, 120), &tiny_model(5)).await;
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(240), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Completed, "{:?}", run.stop_reason);
    assert_eq!(run.rounds[0].sites, ["alpha", "beta", "gamma"]);
}

/// Renewals and additions that cannot be done are refused with the reason, and leave the CA's
/// records as they were; an admin added later gets in.
#[tokio::test(flavor = "multi_thread")]
async fn what_cannot_be_renewed_or_added_is_refused_and_an_added_admin_gets_in() {
    let project = project(&["alpha", "beta"]);
    let _coordinator = start_coordinator(&project).await;
    let root = project.root.to_str().unwrap().to_string();
    let issued = project.root.join("ca/issued.json");

    let (ok, text) = cli(&["revoke", "--project-dir", &root, "--site", "beta"], &[]).await;
    assert!(ok, "{text}");
    let before = std::fs::read(&issued).unwrap();
    for (args, expected) in [
        (
            vec!["renew", "--site", "nobody"],
            "no certificate was issued to site/nobody",
        ),
        (vec!["renew", "--site", "beta"], "site/beta is revoked"),
        (
            vec!["provision", "--add-site", "alpha"],
            "site/alpha already has a kit",
        ),
        (
            vec!["provision", "--add-admin", "researcher"],
            "admin/researcher already has a kit",
        ),
        (vec!["renew", "--site", "Bad/Name"], "not a valid name"),
        (
            vec!["renew", "--site", "alpha", "--validity-days", "0"],
            "--validity-days",
        ),
    ] {
        let mut args = args.clone();
        args.extend(["--project-dir", &root]);
        let (ok, text) = cli(&args, &[]).await;
        assert!(!ok && text.contains(expected), "{args:?}: {text}");
    }
    assert_eq!(std::fs::read(&issued).unwrap(), before, "a refusal wrote");
    let (ok, text) = cli(&["renew", "--project-dir", &root], &[]).await;
    assert!(!ok && text.contains("--site"), "{text}");

    let (ok, text) = cli(
        &[
            "provision",
            "--project-dir",
            &root,
            "--add-admin",
            "auditor",
        ],
        &[],
    )
    .await;
    assert!(ok, "{text}");
    let auditor = project.root.join("admins/auditor");
    let (ok, text) = cli(&["sites", "list", "--kit", auditor.to_str().unwrap()], &[]).await;
    assert!(ok && text.contains("no site has connected yet"), "{text}");
}

/// The coordinator serves its renewed certificate from the next connection on, without a
/// restart, and SIGHUP reloads it too.
#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_takes_its_renewed_certificate_without_a_restart() {
    let project = project(&["alpha"]);
    let coordinator = spawn_coordinator(&project);
    let site = project.site_kit("alpha");
    let site = site.to_str().unwrap().to_string();
    let started = Instant::now();
    while !cli(&["health", "--kit", &site], &[]).await.0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root = project.root.to_str().unwrap().to_string();
    let (ok, text) = cli(
        &[
            "renew",
            "--project-dir",
            &root,
            "--coordinator",
            "--new-key",
            "--validity-days",
            "10",
        ],
        &[],
    )
    .await;
    assert!(
        ok && text.contains("coordinator/coordinator: new certificate"),
        "{text}"
    );
    let (ok, text) = cli(&["health", "--kit", &site], &[]).await;
    assert!(ok, "{text}");
    let log = project.path("coordinator.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("coordinator certificate reloaded"), "{text}");
    // The kit's first certificate had two days; the one now served has ten (nine and some).
    let after = &text[text.find("coordinator certificate reloaded").unwrap()..];
    assert!(
        after.contains("the coordinator's certificate expires on")
            && (after.contains("(in 9 days)") || after.contains("(in 10 days)")),
        "{text}"
    );

    let pid = coordinator.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("SIGHUP: reloading")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGHUP not seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, text) = cli(&["health", "--kit", &site], &[]).await;
    assert!(ok, "the coordinator did not survive SIGHUP: {text}");
}
