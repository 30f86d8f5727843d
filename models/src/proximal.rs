//! FedProx's proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous
//! Networks"): a site minimises its loss plus μ/2 ‖w − w_global‖², which keeps its local model
//! near the round's global one when sites' data differ. Its gradient, μ (w − w_global), is
//! added to each parameter's gradient after the backward pass, so the loss graph and the loss a
//! site reports stay those of the segmentation alone.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// The round's global parameters, held without autodiff, and μ.
pub struct Proximal {
    mu: f64,
    /// Flattened: one map for parameters of every rank.
    global: HashMap<ParamId, Tensor<1>>,
}

impl Proximal {
    /// Takes `model`'s parameters as the global ones; `mu` > 0.
    pub fn new<M: Module>(model: &M, mu: f64) -> Self {
        struct Snapshot(HashMap<ParamId, Tensor<1>>);
        impl ModuleVisitor for Snapshot {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let value = param.val();
                // Batch norms' running statistics are visited too, but are not trained.
                if value.is_require_grad() {
                    let value = value.inner().flatten::<1>(0, D.saturating_sub(1));
                    self.0.insert(param.id, value);
                }
            }
        }
        let mut snapshot = Snapshot(HashMap::new());
        model.visit(&mut snapshot);
        Self {
            mu,
            global: snapshot.0,
        }
    }

    /// Adds μ (w − w_global) to the gradient of every parameter of `model` that has one.
    pub fn add_to<M: Module>(&self, model: &M, grads: &mut GradientsParams) {
        struct Add<'a> {
            proximal: &'a Proximal,
            grads: &'a mut GradientsParams,
        }
        impl ModuleVisitor for Add<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(global) = self.proximal.global.get(&param.id) else {
                    return;
                };
                let Some(grad) = self.grads.remove::<D>(param.id) else {
                    return;
                };
                let value = param.val().inner();
                let global = global.clone().reshape(value.dims());
                let pull = (value - global).mul_scalar(self.proximal.mu);
                self.grads.register(param.id, grad + pull);
            }
        }
        model.visit(&mut Add {
            proximal: self,
            grads,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelSpec;
    use crate::bench::{synthetic_batch, tensor};
    use crate::loss::segmentation_loss;
    use crate::network::{initial_weights, load_model};
    use crate::precision::{MixedPrecision, Precision};
    use crate::train::{optimizer, step};
    use crate::unet::Segmenter;
    use burn::tensor::Device;

    /// A parameter's value, its plain gradient and its gradient with the proximal term.
    struct Seen {
        value: Vec<f32>,
        plain: Vec<f32>,
        proximal: Vec<f32>,
    }

    fn read<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    struct Collect<'a> {
        plain: &'a GradientsParams,
        proximal: &'a GradientsParams,
        seen: HashMap<ParamId, Seen>,
    }

    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (Some(plain), Some(proximal)) = (
                self.plain.get::<D>(param.id),
                self.proximal.get::<D>(param.id),
            ) else {
                return;
            };
            let seen = Seen {
                value: read(param.val().inner()),
                plain: read(plain),
                proximal: read(proximal),
            };
            self.seen.insert(param.id, seen);
        }
    }

    #[test]
    fn the_proximal_gradient_is_mu_times_the_distance_from_the_global_model() {
        let spec = ModelSpec::tiny();
        let weights = initial_weights(&spec, 1).unwrap();
        let device = Device::flex().autodiff();
        let (_, model) = load_model(&weights, &device).unwrap();
        let mu = 0.5;
        let proximal = Proximal::new(&model, mu);
        let global: HashMap<ParamId, Vec<f32>> = proximal
            .global
            .iter()
            .map(|(id, t)| (*id, read(t.clone())))
            .collect();
        let batch = synthetic_batch(4, spec.image_size, 2, spec.classes, 3);
        let x = || tensor::<4>(&batch.tensors["x"], &device);
        let y = || tensor::<4>(&batch.tensors["y"], &device);
        // A local step moves the model away from the global one (the ids stay).
        let mut adamw = optimizer(1e-4);
        let (local, _, _) = step(
            model,
            &mut adamw,
            x(),
            y(),
            5e-2,
            None,
            &mut MixedPrecision::new(Precision::F32),
        )
        .unwrap();

        let grads = |local: &crate::UNet2d| {
            let loss = segmentation_loss(local.forward(x()), y());
            GradientsParams::from_grads(loss.backward(), local)
        };
        let plain = grads(&local);
        let mut with_term = grads(&local);
        proximal.add_to(&local, &mut with_term);

        let mut collect = Collect {
            plain: &plain,
            proximal: &with_term,
            seen: HashMap::new(),
        };
        local.visit(&mut collect);
        assert_eq!(
            collect.seen.len(),
            global.len(),
            "every parameter is pulled"
        );
        let mut largest_pull = 0f32;
        for (id, seen) in &collect.seen {
            let global = &global[id];
            for (i, global) in global.iter().enumerate() {
                let expected = mu as f32 * (seen.value[i] - global);
                let added = seen.proximal[i] - seen.plain[i];
                let scale = 1.0 + seen.plain[i].abs();
                assert!(
                    (added - expected).abs() <= 1e-5 * scale,
                    "parameter {id}, element {i}: added {added}, expected {expected}"
                );
                largest_pull = largest_pull.max(expected.abs());
            }
        }
        assert!(
            largest_pull > 1e-3,
            "the local step moved nothing: {largest_pull}"
        );
    }
}
