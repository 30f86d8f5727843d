#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = alveolus_imaging::fuzzing::dataset_toml(data);
});
