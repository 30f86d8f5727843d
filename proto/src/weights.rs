//! Named f32 tensors, the form in which models and updates travel and rest.
//!
//! The file format is safetensors, so PyTorch (`safetensors.torch.load_file`) reads our
//! checkpoints as they are. Encoding is deterministic (tensors in name order, contiguous data,
//! metadata keys sorted), so equal weights give equal bytes and thus equal versions.

use std::collections::BTreeMap;

use bytes::Bytes;

/// The safetensors metadata key under which a model file describes its network (JSON, read by
/// `alveolus_models::ModelSpec`): what makes a file of tensors a model agents can train.
pub const MODEL_METADATA_KEY: &str = "alveolus.model";

/// PyTorch's name of the batch-counting buffer in every batch-norm layer.
pub const BATCHES_TRACKED: &str = "num_batches_tracked";

/// Whether `name` is a buffer (batch-norm statistics or counter), which training estimates
/// from the data it sees, rather than a learned parameter, which gradients train.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with(BATCHES_TRACKED)
}

/// One tensor: its shape and its values in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Result<Self, WeightsError> {
        let expected: usize = shape.iter().product();
        if expected != values.len() {
            return Err(WeightsError::ShapeMismatch {
                name: String::new(),
                expected: shape,
                found: vec![values.len()],
            });
        }
        Ok(Self { shape, values })
    }
}

/// A model's parameters and buffers by name, plus string metadata (the architecture, for one).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightsError {
    #[error("not a readable safetensors file: {0}")]
    Format(String),
    #[error("tensor `{name}` has dtype {dtype}; only F32 is accepted")]
    Dtype { name: String, dtype: String },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{0}` is missing")]
    Missing(String),
    #[error("tensor `{0}` is not part of the model")]
    Unexpected(String),
    #[error("tensor `{name}` holds a non-finite value ({value}) at index {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
}

impl Weights {
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(|t| t.values.len()).sum()
    }

    /// Serialises to safetensors bytes.
    pub fn encode(&self) -> Bytes {
        let header = self.header();
        let mut out = Vec::with_capacity(8 + header.len() + self.num_values() * 4);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for tensor in self.tensors.values() {
            for v in &tensor.values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Bytes::from(out)
    }

    /// How many bytes [`Weights::encode`] gives, without building them: what an update costs
    /// on the wire.
    pub fn encoded_len(&self) -> usize {
        8 + self.header().len() + self.num_values() * 4
    }

    /// The safetensors JSON header, padded so that the data starts 8-byte aligned, as
    /// safetensors readers that memory-map expect.
    fn header(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::json!(self.metadata));
        }
        let mut offset = 0usize;
        for (name, tensor) in &self.tensors {
            let end = offset + tensor.values.len() * 4;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": tensor.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut header =
            serde_json::to_vec(&header).expect("a JSON map of strings always serialises");
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        header
    }

    /// Parses safetensors bytes holding F32 tensors only.
    pub fn decode(bytes: &[u8]) -> Result<Self, WeightsError> {
        let parsed = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| WeightsError::Format(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| WeightsError::Format(e.to_string()))?;
        let metadata = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in parsed.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(WeightsError::Dtype {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(
                name,
                Tensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
        Ok(Self { tensors, metadata })
    }

    /// Checks that `other` has exactly this set of tensor names and shapes.
    pub fn check_same_layout(&self, other: &Weights) -> Result<(), WeightsError> {
        for (name, tensor) in &self.tensors {
            let theirs = other
                .tensors
                .get(name)
                .ok_or_else(|| WeightsError::Missing(name.clone()))?;
            if theirs.shape != tensor.shape {
                return Err(WeightsError::ShapeMismatch {
                    name: name.clone(),
                    expected: tensor.shape.clone(),
                    found: theirs.shape.clone(),
                });
            }
        }
        if let Some(extra) = other
            .tensors
            .keys()
            .find(|n| !self.tensors.contains_key(*n))
        {
            return Err(WeightsError::Unexpected(extra.clone()));
        }
        Ok(())
    }

    /// Refuses NaN and infinities, naming the first offending tensor.
    pub fn check_finite(&self) -> Result<(), WeightsError> {
        for (name, tensor) in &self.tensors {
            if let Some((index, value)) = tensor
                .values
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
            {
                return Err(WeightsError::NonFinite {
                    name: name.clone(),
                    index,
                    value: *value,
                });
            }
        }
        Ok(())
    }

    /// Refuses an update (`self`) that would take a value of `base` out of f32's range: each
    /// update may be finite and the model it makes not (3e38 on 3e38), and the aggregate of
    /// such updates would be infinite. Layouts must already match.
    pub fn check_finite_on(&self, base: &Weights) -> Result<(), WeightsError> {
        for (name, tensor) in &self.tensors {
            let Some(b) = base.tensors.get(name) else {
                continue;
            };
            if let Some((index, value)) = tensor
                .values
                .iter()
                .zip(&b.values)
                .map(|(u, b)| u + b)
                .enumerate()
                .find(|(_, v)| !v.is_finite())
            {
                return Err(WeightsError::NonFinite {
                    name: format!("{name} (the model this update makes)"),
                    index,
                    value,
                });
            }
        }
        Ok(())
    }

    /// Element-wise `self + update`, for an update of this model's layout: the model a site's
    /// update makes. Keeps this model's metadata (its network's description).
    pub fn plus(&self, update: &Weights) -> Result<Weights, WeightsError> {
        self.check_same_layout(update)?;
        let mut sum = self.clone();
        for (name, tensor) in &mut sum.tensors {
            for (value, u) in tensor.values.iter_mut().zip(&update.tensors[name].values) {
                *value += u;
            }
        }
        Ok(sum)
    }

    /// Element-wise `self - base`, for two models of the same layout: the update a site sends.
    pub fn minus(&self, base: &Weights) -> Result<Weights, WeightsError> {
        base.check_same_layout(self)?;
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let b = &base.tensors[name];
                let values = t.values.iter().zip(&b.values).map(|(x, y)| x - y).collect();
                (
                    name.clone(),
                    Tensor {
                        shape: t.shape.clone(),
                        values,
                    },
                )
            })
            .collect();
        Ok(Weights {
            tensors,
            metadata: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Weights {
        let mut w = Weights::default();
        w.tensors.insert(
            "enc.0.conv.weight".into(),
            Tensor::new(vec![2, 1, 1, 1], vec![0.5, -1.25]).unwrap(),
        );
        w.tensors.insert(
            "head.bias".into(),
            Tensor::new(vec![3], vec![1.0, 2.0, 3.0]).unwrap(),
        );
        w.metadata
            .insert("alveolus.model".into(), "{\"kind\":\"unet2d\"}".into());
        w
    }

    #[test]
    fn encode_decode_round_trip_is_exact_and_deterministic() {
        let w = sample();
        let bytes = w.encode();
        assert_eq!(w.encoded_len(), bytes.len());
        assert_eq!(bytes, sample().encode());
        assert_eq!(Weights::decode(&bytes).unwrap(), w);
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(matches!(
            Weights::decode(b"nope"),
            Err(WeightsError::Format(_))
        ));
        let bytes = sample().encode();
        assert!(Weights::decode(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn layout_and_finiteness_checks_name_the_tensor() {
        let w = sample();
        let mut other = sample();
        other.tensors.get_mut("head.bias").unwrap().shape = vec![1, 3];
        assert!(matches!(
            w.check_same_layout(&other),
            Err(WeightsError::ShapeMismatch { name, .. }) if name == "head.bias"
        ));
        let mut other = sample();
        other.tensors.remove("head.bias");
        assert_eq!(
            w.check_same_layout(&other),
            Err(WeightsError::Missing("head.bias".into()))
        );
        let mut other = sample();
        other.tensors.get_mut("head.bias").unwrap().values[1] = f32::NAN;
        assert!(matches!(
            other.check_finite(),
            Err(WeightsError::NonFinite { index: 1, .. })
        ));
    }

    #[test]
    fn minus_gives_the_update() {
        let w = sample();
        let mut local = sample();
        local.tensors.get_mut("head.bias").unwrap().values[0] = 1.5;
        let delta = local.minus(&w).unwrap();
        assert_eq!(delta.tensors["head.bias"].values, vec![0.5, 0.0, 0.0]);
    }
}
