//! PyTorch loads our model files with `load_state_dict(strict=True)` and computes what we compute.
//!
//! Needs Python with torch (`scripts/python-env` makes `.venv`). Runs when
//! `ALVEOLUS_SLOW_TESTS=1` (as in CI), where a missing PyTorch is a failure; otherwise it says
//! it skipped.

use std::path::Path;
use std::process::Command;

use alveolus_models::bench::tensor;
use alveolus_models::network::{initial_weights, load_model, load_model_3d};
use alveolus_models::spec::Norm;
use alveolus_models::{Device, ModelSpec, NamedTensor, Segmenter, Weights, pytorch};
use burn::module::Module;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn slow_tests() -> bool {
    std::env::var("ALVEOLUS_SLOW_TESTS").is_ok_and(|v| v == "1")
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Initial weights with every batch-norm statistic and scale moved off its default, so that a
/// wrong mapping of `running_var` or `weight` shows in the output.
fn model_with_nontrivial_statistics(spec: &ModelSpec) -> Weights {
    let mut weights = initial_weights(spec, 5).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    for (name, tensor) in weights.tensors.iter_mut() {
        let nudge: Option<fn(&mut StdRng) -> f32> = if name.ends_with("running_var") {
            Some(|r| r.random_range(0.5..2.0))
        } else if name.ends_with("running_mean") {
            Some(|r| r.random_range(-0.3..0.3))
        } else if name.contains("norm") && name.ends_with("weight") {
            Some(|r| r.random_range(0.5..1.5))
        } else if name.contains("norm") && name.ends_with("bias") {
            Some(|r| r.random_range(-0.2..0.2))
        } else {
            None
        };
        if let Some(nudge) = nudge {
            tensor.values.iter_mut().for_each(|v| *v = nudge(&mut rng));
        }
    }
    weights
}

#[test]
fn pytorch_loads_our_file_strictly_and_computes_our_output() {
    let python = pytorch::python(workspace_root());
    let has_torch = Command::new(&python)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        assert!(
            !slow_tests(),
            "{} cannot import torch: run scripts/python-env or set ALVEOLUS_PYTHON",
            python.display()
        );
        eprintln!(
            "skipped: no PyTorch at {} (ALVEOLUS_SLOW_TESTS=1 makes this a failure)",
            python.display()
        );
        return;
    }

    // Slice and patch networks, with batch and instance norm: all must load strictly and agree.
    let instance = ModelSpec {
        norm: Norm::Instance,
        ..ModelSpec::small()
    };
    for spec in [ModelSpec::small(), ModelSpec::tiny_3d(), instance] {
        compare_with_pytorch(&python, &spec);
    }
}

fn ours(weights: &Weights, spec: &ModelSpec, input: &NamedTensor) -> Vec<f32> {
    let device = Device::flex();
    let logits = if spec.spatial_dims() == 3 {
        let (_, model) = load_model_3d(weights, &device).unwrap();
        model
            .valid()
            .forward(tensor::<5>(input, &device))
            .into_data()
    } else {
        let (_, model) = load_model(weights, &device).unwrap();
        model
            .valid()
            .forward(tensor::<4>(input, &device))
            .into_data()
    };
    logits.convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn compare_with_pytorch(python: &Path, spec: &ModelSpec) {
    let weights = model_with_nontrivial_statistics(spec);
    let n = spec.image_size;
    let shape = [vec![2, 1], vec![n; spec.spatial_dims()]].concat();
    let mut rng = StdRng::seed_from_u64(2);
    let input = NamedTensor {
        values: (0..shape.iter().product())
            .map(|_| rng.random_range(0.0..1.0))
            .collect(),
        shape: shape.clone(),
    };
    let ours = ours(&weights, spec, &input);

    let dir = tempfile::tempdir().unwrap();
    pytorch::write_scripts(dir.path()).unwrap();
    let model_path = dir.path().join("model.safetensors");
    std::fs::write(&model_path, weights.encode()).unwrap();
    let mut batch = Weights::default();
    batch.tensors.insert("x".into(), input);
    let input_path = dir.path().join("input.safetensors");
    std::fs::write(&input_path, batch.encode()).unwrap();
    let output_path = dir.path().join("output.safetensors");

    let run = Command::new(python)
        .arg(dir.path().join("run_model.py"))
        .args([&model_path, &input_path, &output_path])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "PyTorch refused our model:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let theirs = Weights::decode(&std::fs::read(&output_path).unwrap()).unwrap();
    let logits = &theirs.tensors["logits"];
    let mut expected = shape;
    expected[1] = spec.classes;
    assert_eq!(logits.shape, expected, "{}", spec.kind);
    let worst = ours
        .iter()
        .zip(&logits.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "{}: largest difference from PyTorch: {worst}",
        spec.kind
    );
}
