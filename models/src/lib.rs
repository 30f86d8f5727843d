//! Segmentation networks for chest CT, in burn.
//!
//! A model is described by a [`ModelSpec`] (which travels inside every checkpoint's metadata),
//! built as a burn module, trained by [`train`], and exchanged as [`Weights`]: named f32 tensors
//! that the coordinator can aggregate without knowing anything about burn.

pub mod augment;
pub mod bench;
pub mod device;
pub mod hausdorff;
pub mod infer;
pub mod loss;
pub mod metrics;
pub mod network;
pub mod precision;
pub mod proximal;
pub mod pytorch;
pub mod schedule;
pub mod spec;
pub mod train;
pub mod trainable;
pub mod unet;
pub mod weights;

pub use alveolus_proto::weights::{Tensor as NamedTensor, Weights};
/// The burn device type, re-exported so that users of this crate need not depend on burn.
pub use burn::tensor::Device;
pub use device::{DeviceChoice, DeviceError, ResolvedDevice};
pub use infer::Inference;
pub use metrics::SegmentationCounts;
pub use precision::Precision;
pub use schedule::Schedule;
pub use spec::{ModelSpec, SpecError};
pub use train::{LabelledSlice, Progress, TrainOptions, TrainOutcome};
pub use unet::{Segmenter, UNet2d, UNet3d};
