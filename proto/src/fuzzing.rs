//! Entry points for the fuzzers (`fuzz/`) and for replaying their corpus in the stable tests
//! (`proto/tests/fuzz_corpus.rs`): each takes arbitrary bytes, as a peer or a file could send
//! them, and must return, whatever they are; a panic is a bug.

use futures::StreamExt;
use prost::Message;

use crate::domain::{
    Join, ModelHeader, RunConfig, RunEvent, RunInfo, Task, TrainingConfig, UpdateHeader,
};
use crate::kit::{ClientKitConfig, kit_role};
use crate::pb;
use crate::transfer::{receive_header, receive_payload};
use crate::weights::Weights;

/// Largest upload a fuzzed transfer may announce: enough for every path, small enough to keep
/// executions fast.
const FUZZ_TRANSFER_LIMIT: u64 = 1 << 20;

/// safetensors bytes into `Weights`; what decodes must encode and decode again to the same bytes.
/// Returns whether the bytes were a model.
pub fn weights(data: &[u8]) -> bool {
    let Ok(weights) = Weights::decode(data) else {
        return false;
    };
    let _ = weights.check_finite();
    let encoded = weights.encode();
    let again = Weights::decode(&encoded).expect("an encoded model decodes");
    assert_eq!(again.encode(), encoded, "decode and encode are inverse");
    true
}

/// A PushUpdate stream: length-delimited `UpdateChunk` messages, through the receiver every
/// upload goes through (header, its domain checks, data chunks, digest trailer). Returns whether
/// a whole update was received.
pub fn update_upload(data: &[u8]) -> bool {
    let mut rest = data;
    let mut messages = Vec::new();
    while !rest.is_empty() {
        match pb::UpdateChunk::decode_length_delimited(&mut rest) {
            Ok(message) => messages.push(Ok(message)),
            Err(_) => break,
        }
    }
    futures::executor::block_on(async {
        let mut stream = futures::stream::iter(messages);
        let Ok(header) = receive_header(&mut stream).await else {
            return false;
        };
        let Ok(header) = UpdateHeader::try_from(header) else {
            return false;
        };
        let Ok(bytes) = receive_payload(&mut stream, header.total_bytes, FUZZ_TRANSFER_LIMIT).await
        else {
            return false;
        };
        assert_eq!(bytes.len() as u64, header.total_bytes);
        // The receiver stops at the trailer; whatever follows is the caller's to refuse.
        let _ = stream.next().await;
        true
    })
}

/// A protobuf message from a peer into its domain type: the first byte picks the message.
pub fn messages(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 9 {
        0 => drop(pb::RunConfig::decode(body).map(RunConfig::try_from)),
        1 => drop(pb::TrainingConfig::decode(body).map(TrainingConfig::try_from)),
        2 => drop(pb::Task::decode(body).map(Task::try_from)),
        3 => drop(pb::UpdateHeader::decode(body).map(UpdateHeader::try_from)),
        4 => drop(pb::RunInfo::decode(body).map(RunInfo::try_from)),
        5 => drop(pb::RunEvent::decode(body).map(RunEvent::try_from)),
        6 => drop(pb::ModelHeader::decode(body).map(ModelHeader::try_from)),
        7 => drop(pb::JoinRequest::decode(body).map(Join::try_from)),
        _ => {
            // What converts back must convert again to the same thing.
            if let Ok(Ok(config)) = pb::RunConfig::decode(body).map(RunConfig::try_from) {
                let again = RunConfig::try_from(pb::RunConfig::from(config.clone()))
                    .expect("a valid config stays valid through the wire");
                assert_eq!(again, config);
            }
        }
    }
}

/// A site's or admin's `kit.toml`.
pub fn kit_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = kit_role(text);
    let _ = toml::from_str::<ClientKitConfig>(text);
}
