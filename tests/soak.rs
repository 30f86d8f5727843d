//! A short soak as a test (`alveolus bench soak` gives the 300-round figures): 100 rounds of 8
//! sites through a coordinator, whose memory, descriptors and tasks must stay flat. Runs only
//! with ALVEOLUS_SLOW_TESTS=1, as CI does.

use std::process::Command;

#[test]
fn a_hundred_rounds_of_eight_sites_leave_memory_descriptors_and_tasks_flat() {
    if std::env::var_os("ALVEOLUS_SLOW_TESTS").is_none() {
        eprintln!("skipped: set ALVEOLUS_SLOW_TESTS=1 to run the soak");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_alveolus"))
        .args([
            "bench", "soak", "--rounds", "100", "--sites", "8", "--every", "20",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("flat:"), "{stdout}");
    // Every sample is printed: 20, 40, ... 100.
    let samples = stdout
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u32>().is_ok())
        })
        .count();
    assert_eq!(samples, 5, "{stdout}");
}
