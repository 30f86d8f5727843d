//! Every input the fuzzers kept (`fuzz/corpus/<target>/`) and every crash they found
//! (`fuzz/artifacts/<target>/`) goes through its target again on the stable toolchain: a
//! crash stays fixed once its input is in the repository.

use std::path::{Path, PathBuf};

use alveolus_proto::fuzzing;

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

fn replay<T>(target: &str, run: fn(&[u8]) -> T) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if std::panic::catch_unwind(|| drop(run(&data))).is_err() {
            panic!("{target} panics on {}", file.display());
        }
    }
    println!("{target}: {} inputs", files.len());
}

#[test]
fn weights_corpus() {
    replay("weights", fuzzing::weights);
    // The seeds are what they claim to be: the fuzzer starts from a real model.
    assert!(fuzzing::weights(&seed("weights", "seed-model")));
}

#[test]
fn update_upload_corpus() {
    replay("update_upload", fuzzing::update_upload);
    // ... and from whole uploads, plain and masked.
    assert!(fuzzing::update_upload(&seed("update_upload", "seed-plain")));
    assert!(fuzzing::update_upload(&seed(
        "update_upload",
        "seed-masked"
    )));
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = inputs(target)
        .into_iter()
        .find(|p| p.ends_with(name))
        .unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn messages_corpus() {
    replay("messages", fuzzing::messages);
}

#[test]
fn kit_toml_corpus() {
    replay("kit_toml", fuzzing::kit_toml);
}
