//! Every backend of this build computes the same network: LibTorch (the `tch` feature) against
//! burn-flex on the same weights and input, at f32 and in mixed precision, and LibTorch's
//! training steps lower the loss at every precision, on the CPU and on a GPU when there is one.
#![cfg(feature = "tch")]

use alveolus_models::Segmenter;
use alveolus_models::bench::{synthetic_batch, tensor};
use alveolus_models::network::{initial_weights, load_model};
use alveolus_models::precision::{MixedPrecision, Precision};
use alveolus_models::train::{optimizer, step};
use alveolus_models::{DeviceChoice, ModelSpec};
use burn::module::Module;

fn logits_on(choice: DeviceChoice, precision: Precision) -> Vec<f32> {
    let spec = ModelSpec::small();
    let weights = initial_weights(&spec, 4).unwrap();
    let batch = synthetic_batch(2, spec.image_size, 2, spec.classes, 3);
    let device = choice.resolve().unwrap().device;
    let (_, model) = load_model(&weights, &device).unwrap();
    model
        .valid()
        .forward_at(tensor::<4>(&batch.tensors["x"], &device), precision)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// The largest difference between two sets of logits, over the largest logit.
fn relative_distance(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let largest = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    worst / largest
}

#[test]
fn libtorch_computes_what_burn_flex_computes() {
    let flex = logits_on(DeviceChoice::Flex, Precision::F32);
    let libtorch = logits_on(DeviceChoice::Cpu, Precision::F32);
    let worst = relative_distance(&flex, &libtorch);
    assert!(worst < 1e-4, "largest relative difference: {worst}");
    // In bf16 both round the same inputs and weights; LibTorch keeps its sums in bf16 between
    // layers where burn-flex's are f32, so they agree to bf16's precision, not f32's.
    let flex = logits_on(DeviceChoice::Flex, Precision::Bf16);
    let libtorch = logits_on(DeviceChoice::Cpu, Precision::Bf16);
    let worst = relative_distance(&flex, &libtorch);
    assert!(worst < 0.05, "bf16: largest relative difference: {worst}");
}

/// The loss over 30 training steps of the tiny network on `choice` at `precision`.
fn losses_on(choice: DeviceChoice, precision: Precision) -> Vec<f64> {
    let spec = ModelSpec::tiny();
    let weights = initial_weights(&spec, 4).unwrap();
    let batch = synthetic_batch(4, spec.image_size, 2, spec.classes, 3);
    let device = choice.resolve().unwrap().device.autodiff();
    let (_, mut model) = load_model(&weights, &device).unwrap();
    let mut optimizer = optimizer(1e-4);
    let mut mixed = MixedPrecision::new(precision);
    let mut losses = Vec::new();
    for _ in 0..30 {
        let x = tensor::<4>(&batch.tensors["x"], &device);
        let y = tensor::<4>(&batch.tensors["y"], &device);
        let (updated, loss, _) = step(model, &mut optimizer, x, y, 1e-2, None, &mut mixed).unwrap();
        model = updated;
        losses.push(loss);
    }
    losses
}

fn assert_training_lowers_the_loss(choice: DeviceChoice) {
    for precision in [Precision::F32, Precision::Bf16, Precision::F16] {
        let losses = losses_on(choice, precision);
        assert!(
            losses[29] < losses[0] * 0.7,
            "{choice} at {precision}: loss {:.3} -> {:.3}",
            losses[0],
            losses[29]
        );
    }
}

#[test]
fn libtorch_training_steps_lower_the_loss_at_every_precision() {
    let resolved = DeviceChoice::Cpu.resolve().unwrap();
    assert!(resolved.backend.contains("LibTorch"), "{resolved}");
    assert_training_lowers_the_loss(DeviceChoice::Cpu);
}

#[test]
fn on_a_gpu_mixed_precision_trains_and_computes_near_f32() {
    let gpu = DeviceChoice::Cuda(0);
    if gpu.resolve().is_err() {
        eprintln!("skipped: this machine has no CUDA device; scripts/gpu-check runs it on one");
        return;
    }
    assert_training_lowers_the_loss(gpu);
    let f32s = logits_on(gpu, Precision::F32);
    assert!(relative_distance(&f32s, &logits_on(DeviceChoice::Flex, Precision::F32)) < 1e-3);
    for precision in [Precision::Bf16, Precision::F16] {
        let worst = relative_distance(&f32s, &logits_on(gpu, precision));
        assert!(
            worst < 0.05,
            "{precision}: largest relative difference {worst}"
        );
    }
}

#[test]
fn a_missing_gpu_is_named_not_a_panic() {
    let err = DeviceChoice::Cuda(64).resolve().unwrap_err();
    assert!(
        matches!(err, alveolus_models::DeviceError::NoSuchGpu { .. }),
        "{err}"
    );
}
