//! Between a burn module and [`Weights`]. Tensor names are the module's field path joined with
//! dots (`encoders.0.conv1.weight`, `decoders.2.norm1.running_var`): stable, and documented in
//! ARCHITECTURE.md.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::{NamedTensor, Weights};

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

struct Collector {
    path: Vec<String>,
    tensors: BTreeMap<String, NamedTensor>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
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
            .insert(self.path.join("."), NamedTensor { shape, values });
    }
}

/// Every float parameter and buffer of `module`, by name.
pub fn to_weights<M: Module>(module: &M) -> Weights {
    let mut collector = Collector {
        path: Vec::new(),
        tensors: BTreeMap::new(),
    };
    module.visit(&mut collector);
    Weights {
        tensors: collector.tensors,
        metadata: BTreeMap::new(),
    }
}

struct Loader<'a> {
    path: Vec<String>,
    weights: &'a Weights,
    used: usize,
    error: Option<LoadError>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let name = self.path.join(".");
        let Some(source) = self.weights.tensors.get(&name) else {
            self.error = Some(LoadError::Missing(name));
            return param;
        };
        let expected = param.lazy_shape().to_vec();
        if source.shape != expected {
            self.error = Some(LoadError::Shape {
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
/// Names and shapes must match exactly, in both directions.
pub fn load_weights<M: Module>(module: M, weights: &Weights) -> Result<M, LoadError> {
    let mut loader = Loader {
        path: Vec::new(),
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
