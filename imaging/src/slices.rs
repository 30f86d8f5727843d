//! Labelled 2D slices, the form a 2D model trains on: 8-bit windowed intensities and dataset
//! labels (0 background, 1 ground-glass opacity, 2 consolidation, 3 lung) at each slice's own
//! size, whatever format they came from, and their resizing to the model's input.

use alveolus_models::LabelledSlice;

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

impl SliceDataset {
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
