//! Inference with a 2D network: class labels or class probabilities per pixel, a batch at a
//! time, so that memory holds one batch of activations however many slices a scan has.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use crate::spec::ModelSpec;
use crate::train::argmax_labels;
use crate::unet::{Segmenter, UNet2d};

/// Slices per forward pass when the caller does not choose: a batch of 256 px slices of the
/// default network stays well under 1 GB of activations.
pub const DEFAULT_BATCH: usize = 8;

/// Predicted class per pixel for each image (`image_size^2` values in [0, 1]).
pub fn predict(
    model: &UNet2d,
    spec: &ModelSpec,
    images: &[&[f32]],
    device: &Device,
) -> Vec<Vec<u8>> {
    let n = spec.image_size;
    let model = model.valid();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(DEFAULT_BATCH) {
        let data: Vec<f32> = chunk.iter().flat_map(|i| i.iter().copied()).collect();
        let x = Tensor::from_data(TensorData::new(data, [chunk.len(), 1, n, n]), device);
        let labels = argmax_labels(model.forward(x));
        out.extend(labels.chunks(n * n).map(<[u8]>::to_vec));
    }
    out
}

/// A network in inference mode (no gradients kept, batch norm on its running statistics).
pub struct Inference {
    model: UNet2d,
    pub spec: ModelSpec,
    device: Device,
}

impl Inference {
    pub fn new(model: &UNet2d, spec: ModelSpec, device: &Device) -> Self {
        Self {
            model: model.valid(),
            spec,
            device: device.clone(),
        }
    }

    /// Softmax class probabilities of a batch: `images` holds `count` images of
    /// `image_size^2` values in [0, 1]; the result holds, per image, `classes` planes of
    /// `image_size^2` probabilities.
    pub fn probabilities(&self, images: Vec<f32>) -> Vec<f32> {
        let n = self.spec.image_size;
        let count = images.len() / (n * n);
        assert_eq!(
            count * n * n,
            images.len(),
            "a batch holds whole {n}x{n} images"
        );
        let x = Tensor::from_data(TensorData::new(images, [count, 1, n, n]), &self.device);
        let probabilities: Tensor<4> = softmax(self.model.forward(x), 1);
        probabilities
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("data converted to f32 reads back as f32")
    }
}
