//! Which parameters a fine-tuning run trains: a site adapting the federation's model to its own
//! patients may keep the encoder (what a CT looks like) and train the decoder (where its
//! lesions lie), or only the normalisation layers (its scanner's intensities), which needs the
//! fewest slices.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ParamGroup};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trainable {
    /// Every parameter.
    #[default]
    All,
    /// The upsampling path and the output head; the encoder and bottleneck are frozen (their
    /// batch norms then normalise with their running statistics, which stay as they are).
    Decoder,
    /// Only the normalisation layers' scale and shift (and, with batch norm, their running
    /// statistics, which follow the site's data).
    Normalisation,
}

impl Trainable {
    /// `model` with everything outside this scope frozen.
    pub fn apply<M: Module>(self, model: M) -> M {
        match self {
            Self::All => model,
            Self::Decoder => model.freeze_group(ParamGroup::from_any_predicates(vec![
                "encoders",
                "bottleneck",
            ])),
            // Convolutions only: freezing whole blocks would also stop their norms.
            Self::Normalisation => model.freeze_group(ParamGroup::from_any_predicates(vec![
                "conv1",
                "conv2",
                "upsamplers",
                "head",
            ])),
        }
    }
}

impl fmt::Display for Trainable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::Decoder => "decoder",
            Self::Normalisation => "norm",
        })
    }
}

impl FromStr for Trainable {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "decoder" => Ok(Self::Decoder),
            "norm" => Ok(Self::Normalisation),
            other => Err(format!(
                "`{other}` is not a part of the network to train: use all, decoder or norm"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::initial_weights;
    use crate::train::{LabelledSlice, TrainOptions, train};
    use crate::{ModelSpec, Weights};
    use alveolus_proto::domain::TrainingConfig;
    use burn::tensor::Device;

    /// The names of the tensors that training on a few slices changed.
    fn changed_by_training(trainable: Trainable) -> (Weights, Vec<String>) {
        let spec = ModelSpec::tiny();
        let start = initial_weights(&spec, 5).unwrap();
        let side = spec.image_size;
        let slices: Vec<LabelledSlice> = (0..4)
            .map(|k| LabelledSlice {
                image: (0..side * side)
                    .map(|i| ((i * 7 + k) % 13) as f32 / 13.0)
                    .collect(),
                mask: (0..side * side)
                    .map(|i| ((i / side + k) % 3) as u8)
                    .collect(),
            })
            .collect();
        let config = TrainingConfig {
            local_epochs: 2,
            learning_rate: 1e-2,
            batch_size: 2,
            ..TrainingConfig::default()
        };
        let options = TrainOptions {
            trainable,
            ..TrainOptions::federated()
        };
        let outcome = train(&start, &slices, &config, &options, &Device::flex(), |_| {}).unwrap();
        let changed = start
            .tensors
            .iter()
            .filter(|(name, t)| outcome.weights.tensors[*name].values != t.values)
            .map(|(name, _)| name.clone())
            .collect();
        (start, changed)
    }

    #[test]
    fn decoder_fine_tuning_leaves_the_encoder_as_it_was() {
        let (start, changed) = changed_by_training(Trainable::Decoder);
        assert!(
            changed
                .iter()
                .all(|n| !n.starts_with("encoders.") && !n.starts_with("bottleneck.")),
            "{changed:?}"
        );
        for trained in [
            "decoders.0.conv1.weight",
            "decoders.0.norm1.weight",
            "head.weight",
        ] {
            assert!(
                changed.iter().any(|n| n == trained),
                "{trained}: {changed:?}"
            );
        }
        assert!(start.tensors.contains_key("encoders.0.conv1.weight"));
    }

    #[test]
    fn normalisation_fine_tuning_trains_only_the_norms() {
        let (_, changed) = changed_by_training(Trainable::Normalisation);
        assert!(changed.iter().all(|n| n.contains(".norm")), "{changed:?}");
        for trained in ["encoders.0.norm1.weight", "decoders.0.norm2.bias"] {
            assert!(
                changed.iter().any(|n| n == trained),
                "{trained}: {changed:?}"
            );
        }
    }

    #[test]
    fn everything_trains_by_default_and_names_parse() {
        let (_, changed) = changed_by_training(Trainable::All);
        assert!(changed.iter().any(|n| n == "encoders.0.conv1.weight"));
        assert!(changed.iter().any(|n| n == "head.weight"));
        for t in [Trainable::All, Trainable::Decoder, Trainable::Normalisation] {
            assert_eq!(t.to_string().parse::<Trainable>(), Ok(t));
        }
        assert!(
            "encoder"
                .parse::<Trainable>()
                .unwrap_err()
                .contains("all, decoder or norm")
        );
    }
}
