//! A network from its weights, and fresh weights for a network: what every path that runs a
//! model (training, evaluation, segmentation, benchmarks) starts from. The architecture comes
//! from the weights' own metadata, so a file is never loaded into a network it was not made
//! for.

use burn::module::Module;
use burn::tensor::Device;

use crate::Weights;
use crate::spec::{ModelSpec, SpecError};
use crate::train::TrainError;
use crate::unet::{UNet2d, UNet3d};
use crate::weights::{load_weights, to_weights};

/// Fresh weights for `spec`, reproducible from `seed`, with the spec in their metadata.
pub fn initial_weights(spec: &ModelSpec, seed: u64) -> Result<Weights, SpecError> {
    spec.validate()?;
    let device = Device::flex();
    device.seed(seed);
    let mut weights = if spec.spatial_dims() == 3 {
        to_weights(&UNet3d::new(spec, &device))
    } else {
        to_weights(&UNet2d::new(spec, &device))
    };
    let (key, value) = spec.to_metadata();
    weights.metadata.insert(key, value);
    Ok(weights)
}

/// The network described by `weights`' metadata, loaded with them.
pub fn load_model(weights: &Weights, device: &Device) -> Result<(ModelSpec, UNet2d), TrainError> {
    load_kind(weights, device, "unet2d", UNet2d::new)
}

/// The 3D network described by `weights`' metadata, loaded with them.
pub fn load_model_3d(
    weights: &Weights,
    device: &Device,
) -> Result<(ModelSpec, UNet3d), TrainError> {
    load_kind(weights, device, "unet3d", UNet3d::new)
}

fn load_kind<N: Module>(
    weights: &Weights,
    device: &Device,
    kind: &'static str,
    build: impl Fn(&ModelSpec, &Device) -> N,
) -> Result<(ModelSpec, N), TrainError> {
    let spec = ModelSpec::from_weights(weights)?;
    if spec.kind != kind {
        return Err(TrainError::Kind {
            found: spec.kind,
            needed: kind,
        });
    }
    let model = load_weights(build(&spec, device), weights)?;
    Ok((spec, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::LoadError;

    #[test]
    fn weights_round_trip_through_the_module_exactly() {
        let spec = ModelSpec::tiny();
        let weights = initial_weights(&spec, 11).unwrap();
        assert_eq!(
            initial_weights(&spec, 11).unwrap(),
            weights,
            "same seed, same weights"
        );
        assert_ne!(
            initial_weights(&spec, 12).unwrap(),
            weights,
            "another seed, other weights"
        );
        let device = Device::flex();
        let (_, model) = load_model(&weights, &device).unwrap();
        let mut back = to_weights(&model);
        back.metadata = weights.metadata.clone();
        assert_eq!(back, weights);
        assert!(weights.tensors.contains_key("encoders.0.conv1.weight"));
        assert!(weights.tensors.contains_key("decoders.1.norm2.running_var"));
        assert!(weights.tensors.contains_key("decoders.1.norm2.weight"));
        assert!(weights.tensors.contains_key("encoders.0.norm1.bias"));
        assert_eq!(
            weights.tensors["bottleneck.norm2.num_batches_tracked"].shape,
            Vec::<usize>::new()
        );
        assert!(
            !weights
                .tensors
                .keys()
                .any(|n| n.contains("gamma") || n.contains("beta"))
        );
        assert!(weights.tensors.contains_key("head.bias"));
    }

    #[test]
    fn instance_norm_models_carry_no_running_statistics() {
        let spec = ModelSpec {
            norm: crate::spec::Norm::Instance,
            ..ModelSpec::tiny()
        };
        let weights = initial_weights(&spec, 3).unwrap();
        assert!(weights.tensors.contains_key("encoders.0.norm1.weight"));
        assert!(weights.tensors.contains_key("decoders.1.norm2.bias"));
        assert!(
            !weights
                .tensors
                .keys()
                .any(|n| n.contains("running_") || n.contains("num_batches")),
            "{:?}",
            weights.tensors.keys().collect::<Vec<_>>()
        );
        let (loaded, _) = load_model(&weights, &Device::flex()).unwrap();
        assert_eq!(loaded, spec);
        // A batch-norm file is not an instance-norm network.
        let mut batch = initial_weights(&ModelSpec::tiny(), 3).unwrap();
        batch.metadata = weights.metadata.clone();
        assert!(load_model(&batch, &Device::flex()).is_err());
    }

    #[test]
    fn loading_refuses_missing_reshaped_and_foreign_tensors() {
        let spec = ModelSpec::tiny();
        let device = Device::flex();
        let weights = initial_weights(&spec, 1).unwrap();
        let mut missing = weights.clone();
        missing.tensors.remove("head.weight");
        assert!(
            matches!(load_model(&missing, &device), Err(TrainError::Load(LoadError::Missing(n))) if n == "head.weight")
        );
        let mut reshaped = weights.clone();
        reshaped.tensors.get_mut("head.bias").unwrap().shape = vec![1, 3];
        assert!(matches!(
            load_model(&reshaped, &device),
            Err(TrainError::Load(LoadError::Shape { .. }))
        ));
        let mut extra = weights.clone();
        extra.tensors.insert(
            "decoy".into(),
            crate::NamedTensor {
                shape: vec![1],
                values: vec![0.0],
            },
        );
        assert!(
            matches!(load_model(&extra, &device), Err(TrainError::Load(LoadError::Unexpected(n))) if n == "decoy")
        );
        let mut anonymous = weights;
        anonymous.metadata.clear();
        assert!(matches!(
            load_model(&anonymous, &device),
            Err(TrainError::Spec(SpecError::Missing))
        ));
    }
}
