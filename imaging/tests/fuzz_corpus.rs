//! Every input the fuzzers kept (`fuzz/corpus/<target>/`) and every crash they found
//! (`fuzz/artifacts/<target>/`) goes through its target again on the stable toolchain: a
//! crash stays fixed once its input is in the repository. The seeds (`seed-*`, written by
//! `fuzz/seeds.py`) must be accepted, so that the fuzzers start from real files.

use std::path::{Path, PathBuf};

use alveolus_imaging::fuzzing;

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

fn replay(target: &str, run: fn(&[u8]) -> bool) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target} panics on {}", file.display());
        }
    }
    println!("{target}: {} inputs", files.len());
    let seeds: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .collect();
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for seed in seeds {
        assert!(
            run(&std::fs::read(seed).unwrap()),
            "{target} refuses its seed {}",
            seed.display()
        );
    }
}

#[test]
fn dicom_series_corpus() {
    replay("dicom_series", fuzzing::dicom_series);
}

#[test]
fn seg_corpus() {
    replay("seg", fuzzing::seg);
}

#[test]
fn nifti_corpus() {
    replay("nifti", fuzzing::nifti);
}

#[test]
fn dataset_toml_corpus() {
    replay("dataset_toml", fuzzing::dataset_toml);
}
