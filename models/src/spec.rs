//! What network a checkpoint holds. Stored as JSON in the safetensors metadata under
//! [`METADATA_KEY`], so a model file is self-describing.

use serde::{Deserialize, Serialize};

use crate::Weights;

pub use alveolus_proto::weights::MODEL_METADATA_KEY as METADATA_KEY;

/// What the label values in a dataset's masks mean. Models with fewer classes merge them (see
/// [`ModelSpec::class_of_label`]).
pub const DATASET_LABELS: [&str; 4] = ["background", "ggo", "consolidation", "lung"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Network family: `unet2d` (slices) or `unet3d` (cubic patches of a volume).
    pub kind: String,
    /// Input channels (1: one windowed CT slice).
    pub in_channels: usize,
    /// Output classes: 2 (background, infection), 3 (background, GGO, consolidation) or
    /// 4 (those and lung parenchyma without lesion).
    pub classes: usize,
    /// Channels of the first level; each deeper level doubles them.
    pub base_channels: usize,
    /// Number of down-sampling steps.
    pub depth: usize,
    /// Side of the square slices (2D) or cubic patches (3D) the network sees.
    pub image_size: usize,
    /// Normalisation after each convolution.
    #[serde(default)]
    pub norm: Norm,
}

/// Normalisation layers. Batch norm is the classic U-Net's; instance norm keeps no running
/// statistics, so nothing site-specific is averaged across hospitals (the nnU-Net choice, and
/// the safer one for sites whose scanners differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    #[default]
    Batch,
    Instance,
}

impl std::str::FromStr for Norm {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "batch" => Ok(Self::Batch),
            "instance" => Ok(Self::Instance),
            other => Err(SpecError::Invalid(format!(
                "normalisation `{other}` is not batch or instance"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("unknown model preset `{0}` (known: tiny, small, default, 3d, tiny3d)")]
    UnknownPreset(String),
    #[error("invalid model spec: {0}")]
    Invalid(String),
    #[error("the model file carries no `{METADATA_KEY}` metadata; it was not written by Alveolus")]
    Missing,
}

impl ModelSpec {
    /// The network sized for the demo and tests on a 2-core CPU.
    pub fn small() -> Self {
        Self {
            kind: "unet2d".into(),
            in_channels: 1,
            classes: 3,
            base_channels: 8,
            depth: 3,
            image_size: 128,
            norm: Norm::Batch,
        }
    }

    /// A very small network for smoke tests: seconds per round on any CPU, learns little.
    pub fn tiny() -> Self {
        Self {
            kind: "unet2d".into(),
            in_channels: 1,
            classes: 3,
            base_channels: 4,
            depth: 2,
            image_size: 32,
            norm: Norm::Batch,
        }
    }

    /// The network sized for 256x256 slices.
    pub fn default_2d() -> Self {
        Self {
            kind: "unet2d".into(),
            in_channels: 1,
            classes: 3,
            base_channels: 16,
            depth: 4,
            image_size: 256,
            norm: Norm::Batch,
        }
    }

    /// The 3D network for 64-voxel cubic patches.
    pub fn patch_3d() -> Self {
        Self {
            kind: "unet3d".into(),
            in_channels: 1,
            classes: 3,
            base_channels: 8,
            depth: 3,
            image_size: 64,
            norm: Norm::Batch,
        }
    }

    /// A very small 3D network for tests: 16-voxel patches.
    pub fn tiny_3d() -> Self {
        Self {
            kind: "unet3d".into(),
            in_channels: 1,
            classes: 3,
            base_channels: 4,
            depth: 2,
            image_size: 16,
            norm: Norm::Batch,
        }
    }

    /// Spatial dimensions of the input: 2 for slices, 3 for patches.
    pub fn spatial_dims(&self) -> usize {
        if self.kind == "unet3d" { 3 } else { 2 }
    }

    pub fn preset(name: &str) -> Result<Self, SpecError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "default" => Ok(Self::default_2d()),
            "3d" => Ok(Self::patch_3d()),
            "tiny3d" => Ok(Self::tiny_3d()),
            other => Err(SpecError::UnknownPreset(other.to_string())),
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if self.kind != "unet2d" && self.kind != "unet3d" {
            return bad(format!(
                "kind `{}` is not supported (unet2d or unet3d)",
                self.kind
            ));
        }
        if self.kind == "unet3d" && self.image_size > 256 {
            return bad(format!(
                "3D patches of {} voxels a side are too large (at most 256)",
                self.image_size
            ));
        }
        if self.in_channels == 0 || self.base_channels == 0 {
            return bad("channels must be positive".into());
        }
        if !(2..=4).contains(&self.classes) {
            return bad(format!(
                "{} classes: use 2 (infection), 3 (GGO, consolidation) or 4 (and lung)",
                self.classes
            ));
        }
        if self.depth == 0 || self.depth > 6 {
            return bad(format!("depth {} is not between 1 and 6", self.depth));
        }
        if self.image_size < 16
            || self.image_size > 2048
            || !self.image_size.is_multiple_of(1 << self.depth)
        {
            return bad(format!(
                "image_size {} must be 16..2048 and divisible by 2^depth = {}",
                self.image_size,
                1 << self.depth
            ));
        }
        Ok(())
    }

    /// Names of the output classes, in channel order.
    pub fn class_names(&self) -> &'static [&'static str] {
        match self.classes {
            2 => &["background", "infection"],
            3 => &DATASET_LABELS[..3],
            _ => &DATASET_LABELS,
        }
    }

    /// The class this model predicts for a dataset label (see [`DATASET_LABELS`]): a binary
    /// model merges GGO and consolidation into infection, a model without a lung class counts
    /// lung as background.
    pub fn class_of_label(&self, label: u8) -> u8 {
        match (self.classes, label) {
            (2, 1 | 2) => 1,
            (2, _) | (3, 3) => 0,
            (_, label) => label,
        }
    }

    pub fn from_weights(weights: &Weights) -> Result<Self, SpecError> {
        let json = weights
            .metadata
            .get(METADATA_KEY)
            .ok_or(SpecError::Missing)?;
        let spec: ModelSpec =
            serde_json::from_str(json).map_err(|e| SpecError::Invalid(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_metadata(&self) -> (String, String) {
        (
            METADATA_KEY.to_string(),
            serde_json::to_string(self).expect("a spec always serialises"),
        )
    }
}
