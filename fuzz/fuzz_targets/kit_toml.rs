#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| alveolus_proto::fuzzing::kit_toml(data));
