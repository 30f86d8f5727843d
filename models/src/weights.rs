//! Between a burn module and [`Weights`].
//!
//! Tensor names are the ones the equivalent PyTorch module has in its `state_dict()`: the field
//! path joined with dots (`encoders.0.conv1.weight`), with burn's batch-norm `gamma`/`beta`
//! called `weight`/`bias` as in `torch.nn.BatchNorm2d`, and each batch norm also carrying
//! PyTorch's `num_batches_tracked` buffer so that `load_state_dict(strict=True)` accepts our
//! files. burn's batch norm uses a fixed momentum and never reads that buffer; we write 0 and
//! ignore it on load (PyTorch reads it only when `momentum=None`). Layouts need no change:
//! burn and PyTorch both store convolutions as `[out, in, k..]` and transposed convolutions as
//! `[in, out, k..]`.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::{NamedTensor, Weights};

pub use alveolus_proto::weights::{BATCHES_TRACKED, is_buffer};

const BATCH_NORM: &str = "Struct:BatchNorm";
/// Layers whose scale and shift burn calls `gamma` and `beta`, and PyTorch `weight` and `bias`.
const AFFINE_NORMS: [&str; 3] = [BATCH_NORM, "Struct:InstanceNorm", "Struct:GroupNorm"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoadError {
    #[error("weights lack tensor `{0}` that the network needs")]
    Missing(String),
    #[error("tensor `{name}` has shape {found:?}; the network needs {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("weights carry tensor `{0}` that the network does not have")]
    Unexpected(String),
}

/// One step down the module tree.
struct Entry {
    /// The field (or `Vec` index, or enum variant) name.
    name: String,
    /// The type burn says holds this field: `Struct:ConvBlock2d`, `Vec`, `Enum:Normalization`.
    container: String,
    /// Whether this module turned out to be a batch norm (one of its fields said so).
    batch_norm: bool,
}

impl Entry {
    /// Enum variants (`Batch` in `Normalization::Batch`) are not attributes in PyTorch.
    fn named(&self) -> bool {
        !self.container.starts_with("Enum:")
    }
}

/// Where a visitor is in the module tree, and the PyTorch names that position gives.
///
/// burn announces each field with the type of the struct that holds it, so a parameter is a
/// normalisation layer's when its own entry names that layer, and a module is a batch norm when
/// one of its fields did.
#[derive(Default)]
struct Path {
    stack: Vec<Entry>,
}

impl Path {
    fn enter(&mut self, name: &str, container_type: &str) {
        if container_type == BATCH_NORM
            && let Some(parent) = self.stack.last_mut()
        {
            parent.batch_norm = true;
        }
        self.stack.push(Entry {
            name: name.to_string(),
            container: container_type.to_string(),
            batch_norm: false,
        });
    }

    fn exit(&mut self) {
        self.stack.pop();
    }

    fn joined(entries: &[Entry]) -> String {
        let names: Vec<&str> = entries
            .iter()
            .filter(|e| e.named())
            .map(|e| e.name.as_str())
            .collect();
        names.join(".")
    }

    /// The PyTorch name of the parameter at the current position.
    fn tensor_name(&self) -> String {
        let Some((last, parents)) = self.stack.split_last() else {
            return String::new();
        };
        let in_norm = AFFINE_NORMS.contains(&last.container.as_str());
        let field = match last.name.as_str() {
            "gamma" if in_norm => "weight",
            "beta" if in_norm => "bias",
            other => other,
        };
        let parent = Self::joined(parents);
        if parent.is_empty() {
            field.to_string()
        } else {
            format!("{parent}.{field}")
        }
    }

    /// `Some(name of its batch counter)` when the module being left is a batch norm.
    fn leaving_batch_norm(&self) -> Option<String> {
        let last = self.stack.last()?;
        last.batch_norm
            .then(|| format!("{}.{BATCHES_TRACKED}", Self::joined(&self.stack)))
    }
}

struct Collector {
    path: Path,
    tensors: BTreeMap<String, NamedTensor>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if let Some(counter) = self.path.leaving_batch_norm() {
            self.tensors.insert(
                counter,
                NamedTensor {
                    shape: vec![],
                    values: vec![0.0],
                },
            );
        }
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let values = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("data converted to f32 reads back as f32");
        self.tensors
            .insert(self.path.tensor_name(), NamedTensor { shape, values });
    }
}

/// Every float parameter and buffer of `module`, by PyTorch name.
pub fn to_weights<M: Module>(module: &M) -> Weights {
    let mut collector = Collector {
        path: Path::default(),
        tensors: BTreeMap::new(),
    };
    module.visit(&mut collector);
    Weights {
        tensors: collector.tensors,
        metadata: BTreeMap::new(),
    }
}

struct Loader<'a> {
    path: Path,
    weights: &'a Weights,
    /// Names the module took, to find what the weights carry beyond them.
    used: BTreeSet<&'a str>,
    error: Option<LoadError>,
}

impl<'a> Loader<'a> {
    fn fail(&mut self, error: LoadError) {
        self.error.get_or_insert(error);
    }

    /// The stored tensor named `name`, marked as taken.
    fn take(&mut self, name: &str) -> Option<&'a NamedTensor> {
        let (stored, tensor) = self.weights.tensors.get_key_value(name)?;
        self.used.insert(stored);
        Some(tensor)
    }
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if let Some(counter) = self.path.leaving_batch_norm() {
            match self.take(&counter) {
                None => self.fail(LoadError::Missing(counter)),
                Some(t) if !t.shape.is_empty() => self.fail(LoadError::Shape {
                    name: counter,
                    expected: vec![],
                    found: t.shape.clone(),
                }),
                Some(_) => {}
            }
        }
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let name = self.path.tensor_name();
        let Some(source) = self.take(&name) else {
            self.fail(LoadError::Missing(name));
            return param;
        };
        let expected = param.lazy_shape().to_vec();
        if source.shape != expected {
            self.fail(LoadError::Shape {
                name,
                expected,
                found: source.shape.clone(),
            });
            return param;
        }
        let device = param.lazy_device();
        let data = TensorData::new(source.values.clone(), source.shape.clone());
        let id = param.id;
        param.transform_for_load(Tensor::from_data(data, &device), id)
    }
}

/// Replaces every float parameter and buffer of `module` with the tensor of the same name.
/// Names and shapes must match exactly, in both directions, as with PyTorch's strict loading.
pub fn load_weights<M: Module>(module: M, weights: &Weights) -> Result<M, LoadError> {
    let mut loader = Loader {
        path: Path::default(),
        weights,
        used: BTreeSet::new(),
        error: None,
    };
    let module = module.map(&mut loader);
    if let Some(error) = loader.error {
        return Err(error);
    }
    match weights
        .tensors
        .keys()
        .find(|n| !loader.used.contains(n.as_str()))
    {
        Some(extra) => Err(LoadError::Unexpected(extra.clone())),
        None => Ok(module),
    }
}
