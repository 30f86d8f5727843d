//! The newcomer's command, run for real: `alveolus demo`. Slow (minutes), so it runs only with
//! ALVEOLUS_SLOW_TESTS=1, as CI does.

use std::process::Command;
use std::time::Instant;

fn slow_tests_enabled() -> bool {
    let enabled = std::env::var_os("ALVEOLUS_SLOW_TESTS").is_some();
    if !enabled {
        eprintln!("skipped: set ALVEOLUS_SLOW_TESTS=1 to run the demo");
    }
    enabled
}

/// Runs `alveolus demo` with `args` into a fresh folder; returns its stdout, the folder (kept
/// alive by the guard) and the seconds it took. A failed demo fails the test with its output.
fn run_demo(args: &[&str]) -> (String, std::path::PathBuf, tempfile::TempDir, f64) {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("demo");
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_alveolus"))
        .args(["demo", "--out", dir.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    (stdout, dir, out, seconds)
}

#[test]
fn demo_runs_over_mtls_to_a_useful_model_in_under_five_minutes() {
    if !slow_tests_enabled() {
        return;
    }
    let (stdout, dir, _out, seconds) = run_demo(&[]);
    assert!(seconds < 300.0, "the demo took {seconds:.0} s");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 5);
    for (i, round) in rounds.iter().enumerate() {
        assert_eq!(round["round"], i as u64 + 1);
        assert_eq!(round["sites"], 3);
        assert!(round["loss"].as_f64().unwrap().is_finite());
    }
    let first = rounds[0]["dice"].as_f64().unwrap();
    let last = rounds.last().unwrap();
    let dice = last["dice"].as_f64().unwrap();
    assert!(
        dice > first + 0.2,
        "validation Dice went from {first:.3} to {dice:.3}"
    );
    // A model worth showing: most of the infection, and some of the consolidation.
    assert!(dice >= 0.60, "final infection Dice {dice:.3}");
    let consolidation = last["consolidation_dice"].as_f64().unwrap();
    assert!(
        consolidation > 0.1,
        "final consolidation Dice {consolidation:.3}"
    );

    // The final model and its manifest are there and agree.
    let model = std::fs::read(dir.join("final-model.safetensors")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("final-model.json")).unwrap()).unwrap();
    assert_eq!(manifest["sha256"], alveolus_proto::sha256_hex(&model));
    assert_eq!(manifest["sha256"], report["final_model"]);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        rounds.len()
    );

    // The run's report: a point per round for the mean and for each of the three sites.
    let html = std::fs::read_to_string(dir.join("report").join("report.html")).unwrap();
    assert!(stdout.contains("report/report.html"), "{stdout}");
    assert_eq!(html.matches(r#"class="point dice""#).count(), rounds.len());
    assert_eq!(
        html.matches(r#"class="point site""#).count(),
        2 * 3 * rounds.len()
    );
    for plot in ["loss.png", "dice.png"] {
        assert!(dir.join("report").join(plot).metadata().unwrap().len() > 10_000);
    }
}

/// The demo with secure aggregation and differential privacy switched on: three hospitals'
/// updates are masked (the coordinator sees only their sum), each adds its share of the DP
/// noise, and ε is reported every round.
#[test]
fn private_demo_masks_updates_reports_epsilon_and_still_learns() {
    if !slow_tests_enabled() {
        return;
    }
    let (stdout, dir, _out, _) = run_demo(&[
        "--rounds",
        "6",
        "--secure-aggregation",
        "--dp-clip",
        "10",
        "--dp-noise",
        "0.001",
    ]);
    assert!(stdout.contains("coordinator sees only the sum"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["secure_aggregation"], true);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 6);
    let mut previous = 0.0;
    for round in rounds {
        assert_eq!(round["sites"], 3);
        let epsilon = round["epsilon"].as_f64().unwrap();
        assert!(epsilon > previous, "epsilon grows round by round");
        previous = epsilon;
    }
    let first = rounds[0]["dice"].as_f64().unwrap();
    let last = rounds.last().unwrap()["dice"].as_f64().unwrap();
    assert!(
        last > first + 0.2,
        "validation Dice went from {first:.3} to {last:.3}"
    );
    // Whoever receives the model knows its guarantee.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("final-model.json")).unwrap()).unwrap();
    assert!(manifest["epsilon"].as_f64().unwrap() > 0.0);
    assert_eq!(manifest["privacy"]["noise_multiplier"], 0.001);
    // The report says why it has no figures per site, and has none.
    let html = std::fs::read_to_string(dir.join("report").join("report.html")).unwrap();
    assert!(html.contains("securely aggregated"), "{html}");
    assert_eq!(html.matches(r#"class="point site""#).count(), 0);
    assert_eq!(html.matches(r#"class="point dice""#).count(), 6);
}
