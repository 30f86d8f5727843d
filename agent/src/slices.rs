//! Labelled PNG slice datasets: `images/NAME.png` (8-bit, already windowed) with
//! `masks/NAME.png` (0 background, 1 ground-glass opacity, 2 consolidation), as in the MedSeg
//! and Zenodo slice sets. An optional `manifest.csv` is not needed: images are paired with masks
//! by file name.
//!
//! Errors name the local file; they are shown to the site only, never sent anywhere.

use std::path::{Path, PathBuf};

use alveolus_models::LabelledSlice;
use alveolus_models::spec::DATASET_LABELS;

#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: not a readable PNG: {message}")]
    Png { path: PathBuf, message: String },
    #[error("{0}: no images/ folder with PNG slices (expected images/*.png and masks/*.png)")]
    NoImages(PathBuf),
    #[error("{image}: no mask at {mask}")]
    MissingMask { image: PathBuf, mask: PathBuf },
    #[error("{mask}: mask is {mask_size:?} but its image is {image_size:?}")]
    SizeMismatch {
        mask: PathBuf,
        mask_size: (usize, usize),
        image_size: (usize, usize),
    },
    #[error(
        "{path}: label value {value} is not 0 (background), 1 (GGO), 2 (consolidation) or 3 (lung)"
    )]
    UnknownLabel { path: PathBuf, value: u8 },
}

/// One grey image and its labels at their original size.
#[derive(Debug, Clone)]
pub struct Slice {
    pub name: String,
    pub width: usize,
    pub height: usize,
    /// Row-major 8-bit intensities.
    pub image: Vec<u8>,
    /// Row-major class labels.
    pub mask: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct SliceDataset {
    pub slices: Vec<Slice>,
}

/// Reads a PNG as 8-bit grey (the first channel of colour images).
pub fn read_gray_png(path: &Path) -> Result<(usize, usize, Vec<u8>), SliceError> {
    let png_err = |message: String| SliceError::Png {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| SliceError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| png_err(e.to_string()))?;
    let mut buffer = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buffer)
        .map_err(|e| png_err(e.to_string()))?;
    let channels = info.color_type.samples();
    let (width, height) = (info.width as usize, info.height as usize);
    let gray = buffer[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|px| px[0])
        .collect::<Vec<u8>>();
    if gray.len() != width * height {
        return Err(png_err("unexpected pixel layout".into()));
    }
    Ok((width, height, gray))
}

impl SliceDataset {
    pub fn open(dir: &Path) -> Result<Self, SliceError> {
        let images_dir = dir.join("images");
        let entries =
            std::fs::read_dir(&images_dir).map_err(|_| SliceError::NoImages(dir.to_path_buf()))?;
        let mut images: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .collect();
        images.sort();
        if images.is_empty() {
            return Err(SliceError::NoImages(dir.to_path_buf()));
        }
        let mut slices = Vec::with_capacity(images.len());
        for image_path in images {
            let file_name = image_path
                .file_name()
                .expect("listed files have names")
                .to_owned();
            let mask_path = dir.join("masks").join(&file_name);
            if !mask_path.is_file() {
                return Err(SliceError::MissingMask {
                    image: image_path,
                    mask: mask_path,
                });
            }
            let (width, height, image) = read_gray_png(&image_path)?;
            let (mw, mh, mask) = read_gray_png(&mask_path)?;
            if (mw, mh) != (width, height) {
                return Err(SliceError::SizeMismatch {
                    mask: mask_path,
                    mask_size: (mw, mh),
                    image_size: (width, height),
                });
            }
            if let Some(&value) = mask.iter().find(|&&v| v as usize >= DATASET_LABELS.len()) {
                return Err(SliceError::UnknownLabel {
                    path: mask_path,
                    value,
                });
            }
            slices.push(Slice {
                name: file_name
                    .to_string_lossy()
                    .trim_end_matches(".png")
                    .to_string(),
                width,
                height,
                image,
                mask,
            });
        }
        Ok(Self { slices })
    }

    pub fn len(&self) -> usize {
        self.slices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// Every slice resized to `size` x `size`, intensities scaled to [0, 1].
    pub fn at_size(&self, size: usize) -> Vec<LabelledSlice> {
        self.slices
            .iter()
            .map(|s| LabelledSlice {
                image: resize_bilinear(&s.image, s.width, s.height, size),
                mask: resize_nearest(&s.mask, s.width, s.height, size, size),
            })
            .collect()
    }
}

/// Bilinear resize of 8-bit grey to a `size` square of f32 in [0, 1] (pixel-centre aligned).
pub fn resize_bilinear(src: &[u8], width: usize, height: usize, size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(size * size);
    let sx = width as f32 / size as f32;
    let sy = height as f32 / size as f32;
    let at = |x: usize, y: usize| src[y * width + x] as f32 / 255.0;
    for oy in 0..size {
        let fy = ((oy as f32 + 0.5) * sy - 0.5).clamp(0.0, (height - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(height - 1);
        for ox in 0..size {
            let fx = ((ox as f32 + 0.5) * sx - 0.5).clamp(0.0, (width - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(width - 1);
            let top = at(x0, y0) * (1.0 - tx) + at(x1, y0) * tx;
            let bottom = at(x0, y1) * (1.0 - tx) + at(x1, y1) * tx;
            out.push(top * (1.0 - ty) + bottom * ty);
        }
    }
    out
}

/// Nearest-neighbour resize of a label map (labels must not be blended).
pub fn resize_nearest(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(out_w * out_h);
    for oy in 0..out_h {
        let y = ((oy * 2 + 1) * height / (2 * out_h)).min(height - 1);
        for ox in 0..out_w {
            let x = ((ox * 2 + 1) * width / (2 * out_w)).min(width - 1);
            out.push(src[y * width + x]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_resize_keeps_labels_and_layout() {
        // 2x2 -> 4x4: each label becomes a 2x2 block.
        let out = resize_nearest(&[0, 1, 2, 0], 2, 2, 4, 4);
        assert_eq!(out, vec![0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 0, 0, 2, 2, 0, 0]);
        let back = resize_nearest(&out, 4, 4, 2, 2);
        assert_eq!(back, vec![0, 1, 2, 0]);
    }

    #[test]
    fn bilinear_resize_preserves_constant_images_and_range() {
        let out = resize_bilinear(&[255; 12], 4, 3, 5);
        assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-6));
        let ramp: Vec<u8> = (0..16).map(|i| (i * 17) as u8).collect();
        let out = resize_bilinear(&ramp, 4, 4, 7);
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
