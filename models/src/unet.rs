//! A 2D U-Net (Ronneberger et al. 2015) with batch normalisation.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::spec::ModelSpec;

/// Two 3x3 convolutions, each followed by batch norm and ReLU.
#[derive(Module, Debug)]
pub struct ConvBlock {
    conv1: Conv2d,
    norm1: BatchNorm,
    conv2: Conv2d,
    norm2: BatchNorm,
}

impl ConvBlock {
    fn new(channels_in: usize, channels_out: usize, device: &Device) -> Self {
        let conv = |cin| {
            Conv2dConfig::new([cin, channels_out], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                // The following batch norm makes a bias redundant.
                .with_bias(false)
                .init(device)
        };
        Self {
            conv1: conv(channels_in),
            norm1: BatchNormConfig::new(channels_out).init(device),
            conv2: conv(channels_out),
            norm2: BatchNormConfig::new(channels_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = relu(self.norm1.forward(self.conv1.forward(x)));
        relu(self.norm2.forward(self.conv2.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct UNet2d {
    /// Encoder levels, shallow to deep; each output is kept as a skip connection.
    encoders: Vec<ConvBlock>,
    bottleneck: ConvBlock,
    /// Up-sampling steps, deep to shallow, each doubling the resolution.
    upsamplers: Vec<ConvTranspose2d>,
    /// Decoder levels, deep to shallow, each fusing an up-sampled map with its skip.
    decoders: Vec<ConvBlock>,
    /// 1x1 convolution to class logits.
    head: Conv2d,
    pool: MaxPool2d,
}

impl UNet2d {
    /// Builds a freshly initialised network. Call [`ModelSpec::validate`] first.
    pub fn new(spec: &ModelSpec, device: &Device) -> Self {
        let width = |level: usize| spec.base_channels << level;
        let encoders = (0..spec.depth)
            .map(|l| {
                let cin = if l == 0 {
                    spec.in_channels
                } else {
                    width(l - 1)
                };
                ConvBlock::new(cin, width(l), device)
            })
            .collect();
        let bottleneck = ConvBlock::new(width(spec.depth - 1), width(spec.depth), device);
        let levels: Vec<usize> = (0..spec.depth).rev().collect();
        let upsamplers = levels
            .iter()
            .map(|&l| {
                ConvTranspose2dConfig::new([width(l + 1), width(l)], [2, 2])
                    .with_stride([2, 2])
                    .init(device)
            })
            .collect();
        let decoders = levels
            .iter()
            .map(|&l| ConvBlock::new(2 * width(l), width(l), device))
            .collect();
        let head = Conv2dConfig::new([width(0), spec.classes], [1, 1]).init(device);
        Self {
            encoders,
            bottleneck,
            upsamplers,
            decoders,
            head,
            pool: MaxPool2dConfig::new([2, 2]).init(),
        }
    }

    /// `[batch, in_channels, H, W]` to class logits `[batch, classes, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut skips = Vec::with_capacity(self.encoders.len());
        let mut x = x;
        for encoder in &self.encoders {
            let features = encoder.forward(x);
            x = self.pool.forward(features.clone());
            skips.push(features);
        }
        x = self.bottleneck.forward(x);
        for ((up, decoder), skip) in self
            .upsamplers
            .iter()
            .zip(&self.decoders)
            .zip(skips.into_iter().rev())
        {
            x = decoder.forward(Tensor::cat(vec![up.forward(x), skip], 1));
        }
        self.head.forward(x)
    }
}
