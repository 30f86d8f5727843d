//! The proto fuzz targets' corpus and crashes, replayed (see `fuzz/replay.rs`).

#[path = "../../fuzz/replay.rs"]
mod replay;

use alveolus_proto::fuzzing;
use replay::replay;

/// The named seeds are accepted: the fuzzers start from a real model and from whole uploads,
/// plain and masked.
fn accepted(seeds: Vec<(String, bool)>, names: &[&str]) {
    for name in names {
        assert!(
            seeds.iter().any(|(seed, ok)| seed == name && *ok),
            "{name} is missing or refused"
        );
    }
}

#[test]
fn weights_corpus() {
    accepted(replay("weights", fuzzing::weights), &["seed-model"]);
}

#[test]
fn update_upload_corpus() {
    accepted(
        replay("update_upload", fuzzing::update_upload),
        &["seed-plain", "seed-masked"],
    );
}

#[test]
fn messages_corpus() {
    replay("messages", fuzzing::messages);
}

#[test]
fn kit_toml_corpus() {
    replay("kit_toml", fuzzing::kit_toml);
}
