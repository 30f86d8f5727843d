//! The RDP accountant against Google's dp-accounting (pip, in `.venv` from scripts/python-env)
//! on a grid of sample rates, noise multipliers, step counts and deltas: ε to 1e-6 relative and
//! the same optimal order. Slow suite: runs with ALVEOLUS_SLOW_TESTS=1 (as in CI), where a
//! missing dp-accounting is a failure; otherwise it says it skipped.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn epsilon_matches_dp_accounting() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = alveolus_models::pytorch::python(root);
    let slow = std::env::var("ALVEOLUS_SLOW_TESTS").is_ok_and(|v| v == "1");
    let available = Command::new(&python)
        .args(["-c", "import dp_accounting"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        assert!(
            !slow,
            "no dp-accounting for {} (run scripts/python-env)",
            python.display()
        );
        eprintln!("skipped: no dp-accounting (ALVEOLUS_SLOW_TESTS=1 makes this a failure)");
        return;
    }
    let mut grid = Vec::new();
    for q in [0.001, 0.01, 0.1, 0.5, 1.0] {
        for z in [0.5, 0.8, 1.1, 2.0, 4.0] {
            for steps in [1u64, 10, 100, 1000] {
                for delta in [1e-5, 1e-8] {
                    grid.push((q, z, steps, delta));
                }
            }
        }
    }
    let rows: Vec<[f64; 4]> = grid
        .iter()
        .map(|&(q, z, s, d)| [q, z, s as f64, d])
        .collect();
    let mut child = Command::new(&python)
        .arg(root.join("privacy/python/epsilon_grid.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&rows).unwrap().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let reference: Vec<[f64; 2]> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(reference.len(), grid.len());
    let mut finite = 0;
    let mut worst: f64 = 0.0;
    for (&(q, z, steps, delta), &[epsilon, order]) in grid.iter().zip(&reference) {
        let ours = alveolus_privacy::epsilon_after(q, z, steps, delta).unwrap();
        let case = format!("q {q}, z {z}, {steps} steps, delta {delta}");
        if epsilon.is_finite() {
            finite += 1;
            let error = (ours.epsilon - epsilon).abs() / epsilon.max(f64::MIN_POSITIVE);
            if ours.epsilon != epsilon {
                worst = worst.max(error);
            }
            assert!(
                error <= 1e-6 || ours.epsilon == epsilon,
                "{case}: ours {}, dp-accounting {epsilon}",
                ours.epsilon
            );
            assert_eq!(ours.order, order, "{case}");
        } else {
            assert!(ours.epsilon.is_infinite(), "{case}: ours {}", ours.epsilon);
        }
    }
    assert!(finite > 150, "{finite} finite cases");
    eprintln!("{finite} finite cases; largest relative difference {worst:e}");
}
