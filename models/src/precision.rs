//! Mixed precision, as PyTorch's autocast and `GradScaler` do it: each convolution (forward and
//! transposed) casts its input and parameters down to bf16 or f16 and its output back to f32,
//! so that on a GPU the products run on tensor cores and move half the bytes. Normalisation,
//! its statistics, the loss, the optimizer state and the weights themselves stay f32: the
//! parameters are cast inside the autodiff graph, so their gradients arrive in f32 and AdamW
//! updates f32 master weights, and what a site sends is f32 as before.
//!
//! f16's smallest normal number is 6e-5, below which small gradients vanish; its training
//! scales the loss up before the backward pass and the gradients down after it, skipping a
//! step whose gradients overflowed and halving the scale (dynamic loss scaling, Micikevicius
//! et al. 2018). bf16 has f32's range and needs none of that.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d};
use burn::optim::GradientsParams;
use burn::tensor::{FloatDType, Tensor};

pub use alveolus_proto::domain::Precision;

/// The number format a precision computes convolutions in; None for f32, which casts nothing.
fn reduced(precision: Precision) -> Option<FloatDType> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16 => Some(FloatDType::BF16),
        Precision::F16 => Some(FloatDType::F16),
    }
}

fn cast<const D: usize>(param: &Param<Tensor<D>>, dtype: FloatDType) -> Param<Tensor<D>> {
    // The same id: a gradient that reaches the cast flows on to the f32 parameter under it.
    Param::initialized(param.id, param.val().cast(dtype))
}

/// A layer that can run at a reduced precision and give f32 back.
pub(crate) trait AtPrecision<const D: usize> {
    fn forward_at(&self, x: Tensor<D>, precision: Precision) -> Tensor<D>;
}

macro_rules! convolutions_at_precision {
    ($($conv:ident, rank $rank:literal);* $(;)?) => {$(
        impl AtPrecision<$rank> for $conv {
            fn forward_at(&self, x: Tensor<$rank>, precision: Precision) -> Tensor<$rank> {
                let Some(dtype) = reduced(precision) else {
                    return self.forward(x);
                };
                let reduced = Self {
                    weight: cast(&self.weight, dtype),
                    bias: self.bias.as_ref().map(|b| cast(b, dtype)),
                    ..self.clone()
                };
                reduced.forward(x.cast(dtype)).cast(FloatDType::F32)
            }
        }
    )*};
}

convolutions_at_precision!(
    Conv2d, rank 4;
    Conv3d, rank 5;
    ConvTranspose2d, rank 4;
    ConvTranspose3d, rank 5;
);

/// Dynamic loss scaling for f16, with `torch.amp.GradScaler`'s defaults: start at 2^16, halve
/// on an overflow (and skip that step), double after 2000 steps without one.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    scale: f64,
    /// Steps since the last overflow or growth.
    good_steps: u32,
    /// Overflows in a row: a run whose every step overflows is broken, not unlucky.
    overflows: u32,
}

/// Steps without an overflow before the scale doubles.
const GROWTH_INTERVAL: u32 = 2000;
/// Overflows in a row after which training stops with an error instead of skipping on: the
/// scale has fallen by 2^30 by then, so the gradients are not finite at any scale.
pub const MAX_OVERFLOWS_IN_A_ROW: u32 = 30;

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            overflows: 0,
        }
    }
}

/// What became of a step's gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unscaled {
    /// Finite and divided by the scale: take the step.
    Finite,
    /// Some overflowed: skip the step; the scale was halved.
    Overflow,
}

/// A training run's precision and, for f16, its loss scale, carried from step to step.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPrecision {
    precision: Precision,
    scaler: Option<LossScaler>,
}

impl MixedPrecision {
    pub fn new(precision: Precision) -> Self {
        Self {
            precision,
            scaler: (precision == Precision::F16).then(LossScaler::default),
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The loss scaler, for f16 only.
    pub fn scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    pub(crate) fn scaler_mut(&mut self) -> Option<&mut LossScaler> {
        self.scaler.as_mut()
    }
}

impl LossScaler {
    /// What the loss is multiplied by before the backward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Overflows since the last finite step.
    pub fn overflows_in_a_row(&self) -> u32 {
        self.overflows
    }

    /// Divides every gradient of `model`'s parameters by the scale and says whether all were
    /// finite, moving the scale as `GradScaler` does. One read from the device per step.
    pub fn unscale<M: Module>(&mut self, model: &M, grads: &mut GradientsParams) -> Unscaled {
        struct Unscale<'a> {
            grads: &'a mut GradientsParams,
            factor: f64,
            sums: Vec<Tensor<1>>,
        }
        impl ModuleVisitor for Unscale<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(grad) = self.grads.remove::<D>(param.id) else {
                    return;
                };
                let grad = grad.mul_scalar(self.factor);
                // A NaN or an infinity anywhere makes the sum one too.
                self.sums.push(grad.clone().sum());
                self.grads.register(param.id, grad);
            }
        }
        let mut visit = Unscale {
            grads,
            factor: 1.0 / self.scale,
            sums: Vec::new(),
        };
        model.visit(&mut visit);
        let finite = visit.sums.is_empty()
            || Tensor::cat(visit.sums, 0)
                .sum()
                .into_scalar::<f32>()
                .is_finite();
        self.record(finite)
    }

    fn record(&mut self, finite: bool) -> Unscaled {
        if finite {
            self.overflows = 0;
            self.good_steps += 1;
            if self.good_steps == GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            Unscaled::Finite
        } else {
            self.overflows += 1;
            self.good_steps = 0;
            self.scale /= 2.0;
            Unscaled::Overflow
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_two_thousand_good_steps() {
        let mut scaler = LossScaler::default();
        assert_eq!(scaler.record(false), Unscaled::Overflow);
        assert_eq!(scaler.scale(), 32768.0);
        assert_eq!(scaler.overflows_in_a_row(), 1);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert_eq!(scaler.record(true), Unscaled::Finite);
        }
        assert_eq!(scaler.scale(), 32768.0, "one step short of the interval");
        assert_eq!(scaler.overflows_in_a_row(), 0);
        scaler.record(true);
        assert_eq!(scaler.scale(), 65536.0);
        assert!(MixedPrecision::new(Precision::Bf16).scaler().is_none());
        assert!(MixedPrecision::new(Precision::F32).scaler().is_none());
        assert!(MixedPrecision::new(Precision::F16).scaler().is_some());
    }

    use crate::ModelSpec;
    use crate::bench::{synthetic_batch, tensor};
    use crate::network::{initial_weights, load_model};
    use crate::train::{TrainError, optimizer, step};
    use crate::unet::Segmenter;
    use crate::weights::{is_buffer, to_weights};
    use burn::tensor::Device;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    #[test]
    fn reduced_precision_logits_are_f32_and_near_f32s() {
        let spec = ModelSpec::small();
        let weights = initial_weights(&spec, 4).unwrap();
        let batch = synthetic_batch(2, spec.image_size, 2, spec.classes, 3);
        let device = Device::flex();
        let (_, model) = load_model(&weights, &device).unwrap();
        let logits = |precision| {
            let out = model.forward_at(tensor::<4>(&batch.tensors["x"], &device), precision);
            assert_eq!(out.dtype(), burn::tensor::DType::F32, "{precision}");
            values(out)
        };
        let f32s = logits(Precision::F32);
        let largest = f32s.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Relative rounding: 2^-8 for bf16, 2^-11 for f16, compounded over the layers.
        for (precision, bound) in [(Precision::Bf16, 0.05), (Precision::F16, 0.01)] {
            let reduced = logits(precision);
            let furthest = f32s
                .iter()
                .zip(&reduced)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(furthest > 0.0, "{precision} computed exactly f32's logits");
            assert!(
                furthest < bound * largest,
                "{precision}: logits {furthest} from f32's, largest {largest}"
            );
        }
    }

    #[test]
    fn an_f16_step_that_overflows_leaves_the_model_and_halves_the_scale() {
        let spec = ModelSpec::tiny();
        let weights = initial_weights(&spec, 1).unwrap();
        let batch = synthetic_batch(2, spec.image_size, 2, spec.classes, 2);
        let device = Device::flex().autodiff();
        let (_, model) = load_model(&weights, &device).unwrap();
        let mut adamw = optimizer(0.0);
        let mut mixed = MixedPrecision::new(Precision::F16);
        // A scale no gradient survives: f32's largest finite number.
        let huge = f32::MAX as f64;
        mixed.scaler = Some(LossScaler {
            scale: huge,
            ..LossScaler::default()
        });
        let x = || tensor::<4>(&batch.tensors["x"], &device);
        let y = || tensor::<4>(&batch.tensors["y"], &device);
        let (model, loss, _) = step(model, &mut adamw, x(), y(), 1e-2, None, &mut mixed).unwrap();
        assert!(loss.is_finite(), "the reported loss is the unscaled one");
        // The forward pass updated the batch norms' running statistics, as PyTorch's does
        // on a skipped step; what the optimizer moves must not have moved.
        let after = to_weights(&model.valid());
        let moved: Vec<&String> = weights
            .tensors
            .iter()
            .filter(|(name, t)| !is_buffer(name) && after.tensors[*name] != **t)
            .map(|(name, _)| name)
            .collect();
        assert!(moved.is_empty(), "an overflowed step moved {moved:?}");
        let scaler = mixed.scaler().unwrap();
        assert_eq!(
            (scaler.scale(), scaler.overflows_in_a_row()),
            (huge / 2.0, 1)
        );

        // Thirty in a row: the gradients are not finite at any scale, and training says so.
        mixed.scaler = Some(LossScaler {
            scale: huge,
            good_steps: 0,
            overflows: MAX_OVERFLOWS_IN_A_ROW - 1,
        });
        let err = step(model, &mut adamw, x(), y(), 1e-2, None, &mut mixed).unwrap_err();
        assert!(
            matches!(
                err,
                TrainError::Overflow {
                    steps: MAX_OVERFLOWS_IN_A_ROW,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("train at bf16 or f32"), "{err}");
    }
}
