//! Segmentation loss: cross-entropy plus soft Dice over the lesion classes. Cross-entropy gives
//! stable gradients everywhere; Dice keeps the rare lesion pixels from being drowned by
//! background.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};

/// `logits` and `one_hot` are `[batch, classes, spatial..]`. Returns a scalar tensor.
pub fn segmentation_loss<const D: usize>(logits: Tensor<D>, one_hot: Tensor<D>) -> Tensor<1> {
    let dims = logits.dims();
    let classes = dims[1];
    let pixels = (dims.iter().product::<usize>() / classes) as f32;
    let cross_entropy = (log_softmax(logits.clone(), 1) * one_hot.clone())
        .sum()
        .mul_scalar(-1.0 / pixels);

    let probs = softmax(logits, 1)
        .swap_dims(0, 1)
        .reshape([classes as i32, -1]);
    let truth = one_hot.swap_dims(0, 1).reshape([classes as i32, -1]);
    let foreground = 1..classes;
    let probs = probs.slice([foreground.clone()]);
    let truth = truth.slice([foreground]);
    let intersection = (probs.clone() * truth.clone()).sum_dim(1);
    let denominator = probs.sum_dim(1) + truth.sum_dim(1);
    let smooth = 1.0;
    let dice = (intersection.mul_scalar(2.0).add_scalar(smooth)) / denominator.add_scalar(smooth);
    let dice_loss = dice.mean().neg().add_scalar(1.0);
    cross_entropy + dice_loss
}
