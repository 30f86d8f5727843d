//! U-Nets (Ronneberger et al. 2015) with batch normalisation: 2D for slices, 3D for patches of a
//! volume. One template makes both, so they cannot drift apart; their tensor names are the same
//! and match `models/python/alveolus_unet.py`.

use burn::module::Module;
use burn::nn::conv::{
    Conv2d, Conv2dConfig, Conv3d, Conv3dConfig, ConvTranspose2d, ConvTranspose2dConfig,
    ConvTranspose3d, ConvTranspose3dConfig,
};
use burn::nn::norm::{Normalization, NormalizationConfig};
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNormConfig, InstanceNormConfig, PaddingConfig2d, PaddingConfig3d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::precision::{AtPrecision, Precision};
use crate::spec::{ModelSpec, Norm};

/// A network that maps `[batch, in_channels, spatial..]` to class logits of the same extent.
pub trait Segmenter<const D: usize>: Module {
    /// The logits, with the convolutions computed at `precision` and everything else in f32.
    fn forward_at(&self, x: Tensor<D>, precision: Precision) -> Tensor<D>;

    fn forward(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_at(x, Precision::F32)
    }
}

fn norm(kind: Norm, channels: usize, device: &Device) -> Normalization {
    let config: NormalizationConfig = match kind {
        Norm::Batch => BatchNormConfig::new(channels).into(),
        Norm::Instance => InstanceNormConfig::new(channels).into(),
    };
    config.init(device)
}

/// 2x2 max pooling with stride 2.
fn pool2d(x: Tensor<4>) -> Tensor<4> {
    MaxPool2dConfig::new([2, 2]).init().forward(x)
}

/// 2x2x2 max pooling with stride 2, as PyTorch's `MaxPool3d(2)`: pooled in-plane by
/// [`pool2d`], then the larger of each pair of planes (burn has no 3D max pooling).
fn pool3d(x: Tensor<5>) -> Tensor<5> {
    let [b, c, d, h, w] = x.dims();
    let planes = pool2d(x.reshape([b, c * d, h, w]));
    planes
        .reshape([b, c, d / 2, 2, h / 2, w / 2])
        .max_dim(3)
        .reshape([b, c, d / 2, h / 2, w / 2])
}

macro_rules! unet {
    (
        $(#[$doc:meta])*
        $unet:ident, $block:ident, rank $rank:literal,
        $conv:ident($conv_config:ident), $up:ident($up_config:ident),
        padding $padding:expr, three $three:expr, two $two:expr, one $one:expr, pool $pool:ident
    ) => {
        /// Two 3-wide convolutions, each followed by normalisation and ReLU.
        #[derive(Module, Debug)]
        pub struct $block {
            conv1: $conv,
            norm1: Normalization,
            conv2: $conv,
            norm2: Normalization,
        }

        impl $block {
            fn new(channels_in: usize, channels_out: usize, kind: Norm, device: &Device) -> Self {
                let conv = |cin| {
                    $conv_config::new([cin, channels_out], $three)
                        .with_padding($padding)
                        // The following normalisation makes a bias redundant.
                        .with_bias(false)
                        .init(device)
                };
                Self {
                    conv1: conv(channels_in),
                    norm1: norm(kind, channels_out, device),
                    conv2: conv(channels_out),
                    norm2: norm(kind, channels_out, device),
                }
            }

            fn forward(&self, x: Tensor<$rank>, precision: Precision) -> Tensor<$rank> {
                let x = relu(self.norm1.forward(self.conv1.forward_at(x, precision)));
                relu(self.norm2.forward(self.conv2.forward_at(x, precision)))
            }
        }

        $(#[$doc])*
        #[derive(Module, Debug)]
        pub struct $unet {
            /// Encoder levels, shallow to deep; each output is kept as a skip connection.
            encoders: Vec<$block>,
            bottleneck: $block,
            /// Up-sampling steps, deep to shallow, each doubling the resolution.
            upsamplers: Vec<$up>,
            /// Decoder levels, deep to shallow, each fusing an up-sampled map with its skip.
            decoders: Vec<$block>,
            /// 1-wide convolution to class logits.
            head: $conv,
        }

        impl $unet {
            /// Builds a freshly initialised network. Call [`ModelSpec::validate`] first.
            pub fn new(spec: &ModelSpec, device: &Device) -> Self {
                let width = |level: usize| spec.base_channels << level;
                let encoders = (0..spec.depth)
                    .map(|l| {
                        let cin = if l == 0 { spec.in_channels } else { width(l - 1) };
                        $block::new(cin, width(l), spec.norm, device)
                    })
                    .collect();
                let bottleneck =
                    $block::new(width(spec.depth - 1), width(spec.depth), spec.norm, device);
                let levels: Vec<usize> = (0..spec.depth).rev().collect();
                let upsamplers = levels
                    .iter()
                    .map(|&l| {
                        $up_config::new([width(l + 1), width(l)], $two)
                            .with_stride($two)
                            .init(device)
                    })
                    .collect();
                let decoders = levels
                    .iter()
                    .map(|&l| $block::new(2 * width(l), width(l), spec.norm, device))
                    .collect();
                let head = $conv_config::new([width(0), spec.classes], $one).init(device);
                Self {
                    encoders,
                    bottleneck,
                    upsamplers,
                    decoders,
                    head,
                }
            }
        }

        impl Segmenter<$rank> for $unet {
            fn forward_at(&self, x: Tensor<$rank>, precision: Precision) -> Tensor<$rank> {
                let mut skips = Vec::with_capacity(self.encoders.len());
                let mut x = x;
                for encoder in &self.encoders {
                    let features = encoder.forward(x, precision);
                    x = $pool(features.clone());
                    skips.push(features);
                }
                x = self.bottleneck.forward(x, precision);
                for ((up, decoder), skip) in self
                    .upsamplers
                    .iter()
                    .zip(&self.decoders)
                    .zip(skips.into_iter().rev())
                {
                    let up = up.forward_at(x, precision);
                    x = decoder.forward(Tensor::cat(vec![up, skip], 1), precision);
                }
                self.head.forward_at(x, precision)
            }
        }
    };
}

unet!(
    /// The slice network: `[batch, 1, H, W]` to `[batch, classes, H, W]`.
    UNet2d, ConvBlock2d, rank 4,
    Conv2d(Conv2dConfig), ConvTranspose2d(ConvTranspose2dConfig),
    padding PaddingConfig2d::Explicit(1, 1, 1, 1), three [3, 3], two [2, 2], one [1, 1], pool pool2d
);

unet!(
    /// The patch network: `[batch, 1, D, H, W]` to `[batch, classes, D, H, W]`.
    UNet3d, ConvBlock3d, rank 5,
    Conv3d(Conv3dConfig), ConvTranspose3d(ConvTranspose3dConfig),
    padding PaddingConfig3d::Explicit(1, 1, 1), three [3, 3, 3], two [2, 2, 2], one [1, 1, 1], pool pool3d
);

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn pool3d_takes_the_largest_of_each_two_by_two_by_two_block() {
        let device = Device::flex();
        // [1, 1, 2, 2, 4]: two 2x2x2 blocks along the width.
        let values: Vec<f32> = (0..16).map(|v| ((v * 7) % 16) as f32).collect();
        let x = Tensor::<5>::from_data(TensorData::new(values.clone(), [1, 1, 2, 2, 4]), &device);
        let pooled = pool3d(x)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let block_max = |x0: usize| {
            (0..2)
                .flat_map(|z| (0..2).flat_map(move |y| (0..2).map(move |x| (z, y, x0 + x))))
                .map(|(z, y, x)| values[(z * 2 + y) * 4 + x])
                .fold(f32::MIN, f32::max)
        };
        assert_eq!(pooled, vec![block_max(0), block_max(2)]);
    }
}
