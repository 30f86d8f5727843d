//! The imaging fuzz targets' corpus and crashes, replayed (see `fuzz/replay.rs`). Every seed
//! must be read, so that the fuzzers start from real files.

#[path = "../../fuzz/replay.rs"]
mod replay;

use alveolus_imaging::fuzzing;

fn replay(target: &str, run: fn(&[u8]) -> bool) {
    let seeds = replay::replay(target, run);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for (name, read) in seeds {
        assert!(read, "{target} refuses its seed {name}");
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
