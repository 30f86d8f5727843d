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

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::{NamedTensor, Weights};

/// The name of PyTorch's batch-counting buffer in every batch-norm layer.
pub const BATCHES_TRACKED: &str = "num_batches_tracked";

const BATCH_NORM: &str = "Struct:BatchNorm";

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

/// Where a visitor is in the module tree, and the PyTorch names that position gives.
///
/// burn announces each field with the type of the struct that holds it, so a parameter is a
/// batch norm's when its own entry names `BatchNorm`, and a module is a batch norm when one of
/// its fields did.
#[derive(Default)]
struct Path {
    /// Field names from the root down, each with whether it turned out to be a batch norm.
    stack: Vec<(String, bool)>,
    /// Whether the innermost field was announced as a batch norm's.
    in_batch_norm: Vec<bool>,
}

impl Path {
    fn enter(&mut self, name: &str, container_type: &str) {
        let of_batch_norm = container_type == BATCH_NORM;
        if of_batch_norm && let Some(parent) = self.stack.last_mut() {
            parent.1 = true;
        }
        self.stack.push((name.to_string(), false));
        self.in_batch_norm.push(of_batch_norm);
    }

    fn exit(&mut self) {
        self.stack.pop();
        self.in_batch_norm.pop();
    }

    fn joined(&self, fields: &[(String, bool)]) -> String {
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        names.join(".")
    }

    /// The PyTorch name of the parameter at the current position.
    fn tensor_name(&self) -> String {
        let Some((field, _)) = self.stack.last() else {
            return String::new();
        };
        let in_batch_norm = self.in_batch_norm.last() == Some(&true);
        let field = match field.as_str() {
            "gamma" if in_batch_norm => "weight",
            "beta" if in_batch_norm => "bias",
            other => other,
        };
        let parent = self.joined(&self.stack[..self.stack.len() - 1]);
        if parent.is_empty() {
            field.to_string()
        } else {
            format!("{parent}.{field}")
        }
    }

    /// `Some(name of its batch counter)` when the module being left is a batch norm.
    fn leaving_batch_norm(&self) -> Option<String> {
        let (_, is_batch_norm) = self.stack.last()?;
        is_batch_norm.then(|| format!("{}.{BATCHES_TRACKED}", self.joined(&self.stack)))
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
    used: usize,
    error: Option<LoadError>,
}

impl Loader<'_> {
    fn fail(&mut self, error: LoadError) {
        self.error.get_or_insert(error);
    }
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if let Some(counter) = self.path.leaving_batch_norm() {
            match self.weights.tensors.get(&counter) {
                None => self.fail(LoadError::Missing(counter)),
                Some(t) if !t.shape.is_empty() => self.fail(LoadError::Shape {
                    name: counter,
                    expected: vec![],
                    found: t.shape.clone(),
                }),
                Some(_) => self.used += 1,
            }
        }
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let name = self.path.tensor_name();
        let Some(source) = self.weights.tensors.get(&name) else {
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
        self.used += 1;
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
        used: 0,
        error: None,
    };
    let module = module.map(&mut loader);
    if let Some(error) = loader.error {
        return Err(error);
    }
    if loader.used != weights.tensors.len() {
        let known = to_weights(&module);
        let extra = weights
            .tensors
            .keys()
            .find(|n| !known.tensors.contains_key(*n))
            .cloned()
            .unwrap_or_default();
        return Err(LoadError::Unexpected(extra));
    }
    Ok(module)
}
