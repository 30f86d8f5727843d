//! Replays what the fuzzers kept (`fuzz/corpus/<target>/`) and every crash they found
//! (`fuzz/artifacts/<target>/`) on the stable toolchain, so that a crash stays fixed once its
//! input is in the repository. Included by the `tests/fuzz_corpus.rs` of each fuzzed crate.

use std::path::{Path, PathBuf};

/// Every input of `target`, sorted by path.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "artifacts"] {
        if let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) {
            files.extend(entries.map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    files
}

/// Runs `run` on every input of `target` and fails, naming the file, on the first that
/// panics. Returns what each seed (`seed-*`, written by `fuzz/seeds.py`) gave, by file name.
pub fn replay<T>(target: &str, run: fn(&[u8]) -> T) -> Vec<(String, T)> {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    let mut seeds = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let Ok(outcome) = std::panic::catch_unwind(|| run(&data)) else {
            panic!("{target} panics on {}", file.display());
        };
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("seed-") {
            seeds.push((name, outcome));
        }
    }
    println!("{target}: {} inputs", files.len());
    seeds
}
