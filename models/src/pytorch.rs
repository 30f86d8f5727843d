//! The PyTorch side of the house: the reference PyTorch module for our networks and the scripts
//! that run it, shipped inside the binary so that a comparison runs from anywhere.

use std::path::{Path, PathBuf};

/// `alveolus_unet.py`: the PyTorch module whose `state_dict()` names our tensors.
pub const MODULE: &str = include_str!("../python/alveolus_unet.py");
/// `run_model.py`: loads a model strictly and writes its logits for an input.
pub const RUN_MODEL: &str = include_str!("../python/run_model.py");
/// `bench_train.py`: times PyTorch training steps of the same network.
pub const BENCH_TRAIN: &str = include_str!("../python/bench_train.py");
/// `bench_segment.py`: times PyTorch inference of the same network over a scan's planes.
pub const BENCH_SEGMENT: &str = include_str!("../python/bench_segment.py");

/// Writes the scripts into `dir`, which must exist.
pub fn write_scripts(dir: &Path) -> std::io::Result<()> {
    for (name, text) in [
        ("alveolus_unet.py", MODULE),
        ("run_model.py", RUN_MODEL),
        ("bench_train.py", BENCH_TRAIN),
        ("bench_segment.py", BENCH_SEGMENT),
    ] {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

/// The Python interpreter to use: `ALVEOLUS_PYTHON` when set, else the project's `.venv`
/// (made by `scripts/python-env`) when `root` has one, else `python3` from `PATH`.
pub fn python(root: &Path) -> PathBuf {
    if let Some(path) = std::env::var_os("ALVEOLUS_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = root.join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}
