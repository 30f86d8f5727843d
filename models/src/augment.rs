//! Augmentations for CT slices: what a scanner, a patient's position and a reconstruction kernel
//! change between hospitals. Mirror flips, small rotations and scalings (applied to image and
//! mask together; bilinear for the image, nearest for the mask) and intensity jitter (image only).
//! Drawn from the caller's seeded generator, so training stays reproducible.

use rand::Rng;
use rand::rngs::StdRng;

/// How strong the random changes are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentConfig {
    /// Probability of a left-right mirror (lungs are roughly symmetric).
    pub flip: f64,
    /// Largest rotation either way, in degrees.
    pub max_rotation_degrees: f32,
    /// Largest relative zoom either way (0.1: 0.9x to 1.1x).
    pub max_scale: f32,
    /// Largest relative change of contrast, and of brightness in window units.
    pub max_contrast: f32,
    pub max_brightness: f32,
}

impl AugmentConfig {
    /// No change at all: for checks and for models that must see the data as it is.
    pub const NONE: Self = Self {
        flip: 0.0,
        max_rotation_degrees: 0.0,
        max_scale: 0.0,
        max_contrast: 0.0,
        max_brightness: 0.0,
    };
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            flip: 0.5,
            max_rotation_degrees: 10.0,
            max_scale: 0.1,
            max_contrast: 0.1,
            max_brightness: 0.05,
        }
    }
}

/// One drawn transformation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Draw {
    flip: bool,
    angle: f32,
    scale: f32,
    contrast: f32,
    brightness: f32,
}

fn symmetric(rng: &mut StdRng, limit: f32) -> f32 {
    if limit > 0.0 {
        rng.random_range(-limit..=limit)
    } else {
        0.0
    }
}

impl AugmentConfig {
    fn draw(&self, rng: &mut StdRng) -> Draw {
        Draw {
            flip: self.flip > 0.0 && rng.random_bool(self.flip.min(1.0)),
            angle: symmetric(rng, self.max_rotation_degrees).to_radians(),
            scale: 1.0 + symmetric(rng, self.max_scale),
            contrast: 1.0 + symmetric(rng, self.max_contrast),
            brightness: symmetric(rng, self.max_brightness),
        }
    }

    /// A randomly changed copy of one `side x side` slice (intensities in [0, 1]) and its mask.
    pub fn apply(
        &self,
        image: &[f32],
        mask: &[u8],
        side: usize,
        rng: &mut StdRng,
    ) -> (Vec<f32>, Vec<u8>) {
        let d = self.draw(rng);
        let identity_geometry = d.angle == 0.0 && d.scale == 1.0;
        let (mut image_out, mask_out) = if identity_geometry {
            let mut image = image.to_vec();
            let mut mask = mask.to_vec();
            if d.flip {
                image.chunks_mut(side).for_each(<[f32]>::reverse);
                mask.chunks_mut(side).for_each(<[u8]>::reverse);
            }
            (image, mask)
        } else {
            resample(image, mask, side, &d)
        };
        if d.contrast != 1.0 || d.brightness != 0.0 {
            for v in &mut image_out {
                *v = ((*v - 0.5) * d.contrast + 0.5 + d.brightness).clamp(0.0, 1.0);
            }
        }
        (image_out, mask_out)
    }
}

/// Rotation and zoom about the slice centre, then the mirror. Outside the source is air: 0 and
/// background.
fn resample(image: &[f32], mask: &[u8], side: usize, d: &Draw) -> (Vec<f32>, Vec<u8>) {
    let centre = (side as f32 - 1.0) / 2.0;
    let (sin, cos) = d.angle.sin_cos();
    let mut image_out = vec![0f32; side * side];
    let mut mask_out = vec![0u8; side * side];
    let last = side as f32 - 1.0;
    for y in 0..side {
        for x in 0..side {
            let xo = if d.flip { last - x as f32 } else { x as f32 };
            let (dx, dy) = (xo - centre, y as f32 - centre);
            // Inverse map: output pixel -> source position.
            let sx = (cos * dx + sin * dy) / d.scale + centre;
            let sy = (-sin * dx + cos * dy) / d.scale + centre;
            let out = y * side + x;
            if sx < 0.0 || sy < 0.0 || sx > last || sy > last {
                continue;
            }
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(side - 1), (y0 + 1).min(side - 1));
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            let at = |xx: usize, yy: usize| image[yy * side + xx];
            let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
            let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
            image_out[out] = top * (1.0 - fy) + bottom * fy;
            let (nx, ny) = (sx.round() as usize, sy.round() as usize);
            mask_out[out] = mask[ny.min(side - 1) * side + nx.min(side - 1)];
        }
    }
    (image_out, mask_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn square(side: usize) -> (Vec<f32>, Vec<u8>) {
        let mut image = vec![0.2; side * side];
        let mut mask = vec![0u8; side * side];
        for y in 10..20 {
            for x in 4..12 {
                image[y * side + x] = 0.9;
                mask[y * side + x] = 2;
            }
        }
        (image, mask)
    }

    #[test]
    fn none_changes_nothing_and_flip_mirrors_rows() {
        let side = 32;
        let (image, mask) = square(side);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            AugmentConfig::NONE.apply(&image, &mask, side, &mut rng),
            (image.clone(), mask.clone())
        );
        let flip = AugmentConfig {
            flip: 1.0,
            ..AugmentConfig::NONE
        };
        let (fi, fm) = flip.apply(&image, &mask, side, &mut rng);
        assert_eq!(fm[15 * side + (side - 1 - 5)], 2);
        assert_eq!(fm[15 * side + 5], 0);
        assert_eq!(fi[15 * side + (side - 1 - 5)], 0.9);
    }

    #[test]
    fn geometry_moves_image_and_mask_together_and_is_seeded() {
        let side = 64;
        let (image, mask) = square(side);
        let strong = AugmentConfig {
            max_rotation_degrees: 30.0,
            max_scale: 0.2,
            ..AugmentConfig::default()
        };
        let a = strong.apply(&image, &mask, side, &mut StdRng::seed_from_u64(7));
        let b = strong.apply(&image, &mask, side, &mut StdRng::seed_from_u64(7));
        assert_eq!(a, b, "same seed, same augmentation");
        let (image_out, mask_out) = a;
        // Every lesion pixel of the new mask lies on bright image pixels of the new image.
        let lesion: Vec<usize> = (0..side * side).filter(|&i| mask_out[i] == 2).collect();
        assert!(
            lesion.len() > 40,
            "the lesion survives: {} pixels",
            lesion.len()
        );
        let bright = lesion.iter().filter(|&&i| image_out[i] > 0.5).count();
        assert!(
            bright as f64 > 0.9 * lesion.len() as f64,
            "{bright} of {}",
            lesion.len()
        );
        assert!(image_out.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(
            mask_out.iter().all(|&l| l == 0 || l == 2),
            "nearest keeps labels"
        );
    }
}
