//! A 2D model applied to a whole scan: every axial plane windowed and resized to the model's
//! input, run through the network a batch at a time, its class probabilities brought back onto
//! the plane's own pixels before the argmax (probabilities are resized, never labels), then the
//! lungs (from the model where it predicts them, else from HU) and the lesions kept to them.
//!
//! Memory beyond the scan: one byte per voxel for the labels and one for the lungs, the HU lung
//! algorithm's one byte per voxel while it runs, and one batch of planes at the model's size.

use alveolus_models::Inference;

use crate::lung::{self, LungError};
use crate::preprocess::{Intensity, Window, windowed};
use crate::slices::resize_bilinear;
use crate::volume::{Volume, face_neighbours};

/// Dataset labels a segmentation is written in (the label convention of every dataset).
pub const BACKGROUND: u8 = 0;
pub const GROUND_GLASS: u8 = 1;
pub const CONSOLIDATION: u8 = 2;
pub const LUNG: u8 = 3;

/// Where the lung mask comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LungSource {
    /// The model's lung class where it has one (`--classes 4`), else HU.
    #[default]
    Auto,
    /// The model's lung class; a model without one is refused.
    Model,
    /// Hounsfield units alone ([`crate::lung`]), whatever the model predicts.
    Hounsfield,
}

impl std::str::FromStr for LungSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "model" => Ok(Self::Model),
            "hu" => Ok(Self::Hounsfield),
            other => Err(format!("`{other}` is not a lung source: auto, model or hu")),
        }
    }
}

/// How the lung mask of a segmentation was made, as reports say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LungMethod {
    /// The model's lung class.
    Model,
    /// Hounsfield units ([`crate::lung`]).
    Hu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SegmentOptions {
    /// Planes per forward pass.
    pub batch_size: usize,
    pub lung: LungSource,
    /// The HU window the model was trained with (datasets say theirs; the lung window by
    /// default).
    pub window: Window,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            batch_size: alveolus_models::infer::DEFAULT_BATCH,
            lung: LungSource::Auto,
            window: Window::LUNG,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SegmentError {
    #[error(
        "the model predicts infection only (--classes 2); segment reports ground-glass opacity and consolidation apart and needs a model trained with --classes 3 or 4"
    )]
    NoLesionClasses,
    #[error(
        "--lung model needs a model that predicts the lung (trained with --classes 4); this one has {0} classes (use --lung hu or auto)"
    )]
    NoLungClass(usize),
    #[error(
        "--lung hu needs Hounsfield units; PNG slices are already windowed (use --lung auto, or a model trained with --classes 4)"
    )]
    NoHounsfield,
    #[error(transparent)]
    Lung(#[from] LungError),
}

/// A scan's segmentation on its canonical grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Segmentation {
    /// [`BACKGROUND`], [`GROUND_GLASS`], [`CONSOLIDATION`] or [`LUNG`] (lung without lesion).
    /// Where there is a lung mask, lesions lie inside it.
    pub labels: Volume<u8>,
    /// 0, [`lung::RIGHT_LUNG`] or [`lung::LEFT_LUNG`]; `None` where no lung mask can be made (PNG
    /// slices with a model that does not predict the lung).
    pub lungs: Option<Volume<u8>>,
    pub lung_method: Option<LungMethod>,
    /// Lesion voxels the model found that touch no lung: left out of `labels` and of every
    /// volume, and counted here so that the report can say so.
    pub lesion_voxels_outside_lungs: usize,
}

/// Segments `image` (canonical, in `intensity`) with `model`. `progress` hears how many planes
/// of how many are done after each batch.
pub fn segment(
    model: &Inference,
    image: &Volume<f32>,
    intensity: Intensity,
    options: &SegmentOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Segmentation, SegmentError> {
    let classes = model.spec.classes;
    if classes < 3 {
        return Err(SegmentError::NoLesionClasses);
    }
    let hounsfield = matches!(intensity, Intensity::Hounsfield { .. });
    let lung_method = match (options.lung, classes >= 4, hounsfield) {
        (LungSource::Model, false, _) => return Err(SegmentError::NoLungClass(classes)),
        (LungSource::Hounsfield, _, false) => return Err(SegmentError::NoHounsfield),
        (LungSource::Model, true, _) | (LungSource::Auto, true, _) => Some(LungMethod::Model),
        (LungSource::Hounsfield, _, true) | (LungSource::Auto, false, true) => Some(LungMethod::Hu),
        (LungSource::Auto, false, false) => None,
    };

    let started = std::time::Instant::now();
    let mut labels = predict_labels(model, image, intensity, options, &mut progress);
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        "model applied to every plane"
    );
    let started = std::time::Instant::now();
    let lungs = match lung_method {
        None => None,
        Some(LungMethod::Model) => {
            let mask = labels
                .voxels
                .iter()
                .map(|&l| u8::from(l != BACKGROUND))
                .collect();
            Some(lung::split_lungs(Volume {
                geometry: labels.geometry.clone(),
                voxels: mask,
            }))
        }
        Some(LungMethod::Hu) => {
            let padding = match intensity {
                Intensity::Hounsfield { padding } => padding,
                Intensity::Windowed8Bit => None,
            };
            let mut sides = lung::lungs_from_hu(image, padding)?;
            attach_lesions(&mut sides, &labels, image);
            Some(sides)
        }
    };
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "lungs found");
    let mut outside = 0;
    if let Some(lungs) = &lungs {
        for (label, &side) in labels.voxels.iter_mut().zip(&lungs.voxels) {
            *label = match (side, *label) {
                (0, GROUND_GLASS | CONSOLIDATION) => {
                    outside += 1;
                    BACKGROUND
                }
                (0, _) => BACKGROUND,
                (_, GROUND_GLASS) => GROUND_GLASS,
                (_, CONSOLIDATION) => CONSOLIDATION,
                _ => LUNG,
            };
        }
    }
    Ok(Segmentation {
        labels,
        lungs,
        lung_method,
        lesion_voxels_outside_lungs: outside,
    })
}

/// The model's classes for every plane, on the planes' own pixels (for 3- and 4-class models
/// these are dataset labels).
pub fn predict_labels(
    model: &Inference,
    image: &Volume<f32>,
    intensity: Intensity,
    options: &SegmentOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Volume<u8> {
    let [width, height, planes] = image.geometry.size;
    let n = model.spec.image_size;
    let classes = model.spec.classes;
    let batch_size = options.batch_size.max(1);
    let upsampler = Upsampler::new(n, width, height);
    let mut labels = vec![BACKGROUND; image.voxels.len()];
    let plane_len = width * height;
    let mut inference = 0.0;
    for first in (0..planes).step_by(batch_size) {
        let last = (first + batch_size).min(planes);
        let mut batch = Vec::with_capacity((last - first) * n * n);
        for z in first..last {
            let plane = windowed(image.plane(z), intensity, &options.window);
            batch.extend(resize_bilinear(&plane, width, height, n));
        }
        let started = std::time::Instant::now();
        let probabilities = model.probabilities(batch);
        inference += started.elapsed().as_secs_f64();
        for (k, z) in (first..last).enumerate() {
            let planes = &probabilities[k * classes * n * n..(k + 1) * classes * n * n];
            let out = &mut labels[z * plane_len..(z + 1) * plane_len];
            // Class indices are dataset labels for 3- and 4-class models.
            upsampler.argmax(planes, classes, out);
        }
        progress(last, planes);
    }
    tracing::debug!(seconds = inference, "of which the network");
    Volume {
        geometry: image.geometry.clone(),
        voxels: labels,
    }
}

/// Bilinear resampling from the model's square grid to a plane's own pixels, the inverse of
/// the pixel-centre-aligned resize that made the model's input.
struct Upsampler {
    n: usize,
    columns: Vec<(usize, usize, f32)>,
    rows: Vec<(usize, usize, f32)>,
}

impl Upsampler {
    fn new(n: usize, width: usize, height: usize) -> Self {
        let taps = |out: usize| -> Vec<(usize, usize, f32)> {
            (0..out)
                .map(|o| {
                    let f =
                        ((o as f32 + 0.5) * n as f32 / out as f32 - 0.5).clamp(0.0, (n - 1) as f32);
                    let i0 = f.floor() as usize;
                    (i0, (i0 + 1).min(n - 1), f - i0 as f32)
                })
                .collect()
        };
        Self {
            n,
            columns: taps(width),
            rows: taps(height),
        }
    }

    /// Per output pixel, the class whose resampled probability is highest (the lower class on
    /// a tie).
    fn argmax(&self, probabilities: &[f32], classes: usize, out: &mut [u8]) {
        let n = self.n;
        let width = self.columns.len();
        for (y, &(y0, y1, ty)) in self.rows.iter().enumerate() {
            for (x, &(x0, x1, tx)) in self.columns.iter().enumerate() {
                let (mut best, mut best_p) = (0u8, f32::NEG_INFINITY);
                for c in 0..classes {
                    let p = &probabilities[c * n * n..(c + 1) * n * n];
                    let top = p[y0 * n + x0] * (1.0 - tx) + p[y0 * n + x1] * tx;
                    let bottom = p[y1 * n + x0] * (1.0 - tx) + p[y1 * n + x1] * tx;
                    let value = top * (1.0 - ty) + bottom * ty;
                    if value > best_p {
                        best = c as u8;
                        best_p = value;
                    }
                }
                out[y * width + x] = best;
            }
        }
    }
}

/// How far from the HU lung mask a lesion may reach and still be given to the lung: dense
/// lesions at the pleura (consolidation is as dense as the chest wall) lie outside the mask.
pub const MAX_ATTACHED_MM: f64 = 20.0;

/// Gives the lesion voxels that touch a lung, and are denser than the lung mask's threshold
/// (which is why they fell outside it), to that lung, up to [`MAX_ATTACHED_MM`] deep.
fn attach_lesions(sides: &mut Volume<u8>, labels: &Volume<u8>, image: &Volume<f32>) {
    let size = sides.geometry.size;
    let finest = sides
        .geometry
        .spacing
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let steps = (MAX_ATTACHED_MM / finest.max(1e-3)).ceil() as usize;
    let attachable = |sides: &[u8], i: usize| {
        sides[i] == 0
            && matches!(labels.voxels[i], GROUND_GLASS | CONSOLIDATION)
            && image.voxels[i] >= lung::AIR_HU
    };
    let neighbours = |i: usize| face_neighbours(i, size);
    let mut front: Vec<usize> = (0..sides.voxels.len())
        .filter(|&i| {
            sides.voxels[i] != 0
                && neighbours(i)
                    .into_iter()
                    .flatten()
                    .any(|j| attachable(&sides.voxels, j))
        })
        .collect();
    for _ in 0..steps {
        let mut next = Vec::new();
        for &i in &front {
            let side = sides.voxels[i];
            for j in neighbours(i).into_iter().flatten() {
                if attachable(&sides.voxels, j) {
                    sides.voxels[j] = side;
                    next.push(j);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        front = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_are_resized_before_the_argmax() {
        // Two classes on a 2x2 model grid; the plane is 4x4. Class 1 wins narrowly in the right
        // column of the model grid: resizing labels would give a half-and-half plane, resizing
        // probabilities moves the boundary to where the interpolated values cross.
        let p1 = [0.2, 0.55, 0.2, 0.55];
        let p0 = p1.map(|p| 1.0 - p);
        let probabilities: Vec<f32> = p0.iter().chain(&p1).copied().collect();
        let up = Upsampler::new(2, 4, 4);
        let mut out = vec![9; 16];
        up.argmax(&probabilities, 2, &mut out);
        // Columns sample the model grid at 0, 0.25, 0.75, 1 (clamped): class 1's probability
        // there is 0.2, 0.29, 0.46, 0.55, so only the last column is class 1.
        for row in out.chunks(4) {
            assert_eq!(row, [0, 0, 0, 1]);
        }
    }

    #[test]
    fn dense_lesions_touching_a_lung_join_it() {
        let geometry = crate::Geometry {
            size: [6, 1, 1],
            spacing: [1.0; 3],
            origin: [0.0; 3],
            direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        };
        let mut sides = Volume {
            geometry: geometry.clone(),
            voxels: vec![1, 1, 0, 0, 0, 0],
        };
        let labels = Volume {
            geometry: geometry.clone(),
            voxels: vec![3, 3, 2, 1, 1, 1],
        };
        // The lesion at index 4 is air-dark: the lung mask would have had it if it were lung.
        let image = Volume {
            geometry,
            voxels: vec![-850.0, -850.0, 30.0, -300.0, -900.0, 30.0],
        };
        attach_lesions(&mut sides, &labels, &image);
        assert_eq!(sides.voxels, vec![1, 1, 1, 1, 0, 0]);
    }
}
