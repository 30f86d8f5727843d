//! Every backend of this build computes the same network: LibTorch (the `tch` feature) against
//! burn-flex on the same weights and input, and LibTorch's training steps lower the loss.
#![cfg(feature = "tch")]

use alveolus_models::Segmenter;
use alveolus_models::bench::{synthetic_batch, tensor};
use alveolus_models::train::{initial_weights, load_model, optimizer, step};
use alveolus_models::{DeviceChoice, ModelSpec};
use burn::module::Module;

fn logits_on(choice: DeviceChoice) -> Vec<f32> {
    let spec = ModelSpec::small();
    let weights = initial_weights(&spec, 4).unwrap();
    let batch = synthetic_batch(2, spec.image_size, 2, spec.classes, 3);
    let device = choice.resolve().unwrap().device;
    let (_, model) = load_model(&weights, &device).unwrap();
    model
        .valid()
        .forward(tensor::<4>(&batch.tensors["x"], &device))
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn libtorch_computes_what_burn_flex_computes() {
    let flex = logits_on(DeviceChoice::Flex);
    let libtorch = logits_on(DeviceChoice::Cpu);
    assert_eq!(flex.len(), libtorch.len());
    let worst = flex
        .iter()
        .zip(&libtorch)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "largest difference: {worst}");
}

#[test]
fn libtorch_training_steps_lower_the_loss() {
    let spec = ModelSpec::tiny();
    let weights = initial_weights(&spec, 4).unwrap();
    let batch = synthetic_batch(4, spec.image_size, 2, spec.classes, 3);
    let resolved = DeviceChoice::Cpu.resolve().unwrap();
    assert!(resolved.backend.contains("LibTorch"), "{resolved}");
    let device = resolved.device.autodiff();
    let (_, mut model) = load_model(&weights, &device).unwrap();
    let mut optimizer = optimizer(1e-4);
    let mut losses = Vec::new();
    for _ in 0..30 {
        let x = tensor::<4>(&batch.tensors["x"], &device);
        let y = tensor::<4>(&batch.tensors["y"], &device);
        let (updated, loss, _) = step(model, &mut optimizer, x, y, 1e-2, None).unwrap();
        model = updated;
        losses.push(loss);
    }
    assert!(
        losses[29] < losses[0] * 0.7,
        "loss {:.3} -> {:.3}",
        losses[0],
        losses[29]
    );
}

#[test]
fn a_missing_gpu_is_named_not_a_panic() {
    let err = DeviceChoice::Cuda(64).resolve().unwrap_err();
    assert!(
        matches!(err, alveolus_models::DeviceError::NoSuchGpu { .. }),
        "{err}"
    );
}
