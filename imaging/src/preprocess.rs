//! From volumes to what the model sees, one path for every format: HU through a window to
//! 8-bit intensities (the form PNG slice sets already have), axial slices that hold labels for
//! 2D models, resized to the model's input by `SliceDataset::at_size`; cubic patches on an
//! isotropic grid for 3D models.

use rand::Rng;

use crate::slices::Slice;
use crate::volume::Volume;

/// What the voxels of an image measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Intensity {
    /// Hounsfield units, with the scanner's padding value (outside the field of view) if any.
    Hounsfield { padding: Option<f32> },
    /// Already windowed to 0..255 by whoever exported the slices (PNG sets).
    Windowed8Bit,
}

/// Air in HU: what padding outside the scanner's field of view is taken to be.
const AIR_HU: f32 = -1000.0;

/// A Hounsfield window: `center - width/2` maps to 0, `center + width/2` to 255.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f32,
    pub width: f32,
}

impl Window {
    /// The usual lung window (-1350..150 HU): parenchyma, GGO and consolidation all stay apart.
    pub const LUNG: Window = Window {
        center: -600.0,
        width: 1500.0,
    };

    pub fn new(center: f32, width: f32) -> Result<Self, String> {
        if !center.is_finite() || !width.is_finite() || width <= 0.0 {
            return Err(format!(
                "a window needs a finite center and a positive width (got center {center}, width {width})"
            ));
        }
        Ok(Self { center, width })
    }

    /// One voxel's 8-bit intensity. 1500 HU over 255 steps is about 6 HU a step, finer than
    /// the contrast between lesions and parenchyma.
    pub fn apply(&self, hu: f32) -> u8 {
        let unit = (hu - (self.center - self.width / 2.0)) / self.width;
        (unit.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// 8-bit intensities of voxels: windowed HU (padding as air), or the values of an already
/// windowed PNG.
pub fn windowed(voxels: &[f32], intensity: Intensity, window: &Window) -> Vec<u8> {
    match intensity {
        Intensity::Hounsfield { padding } => voxels
            .iter()
            .map(|&v| window.apply(if Some(v) == padding { AIR_HU } else { v }))
            .collect(),
        Intensity::Windowed8Bit => voxels
            .iter()
            .map(|&v| v.clamp(0.0, 255.0).round() as u8)
            .collect(),
    }
}

/// Lowest and highest value, the scanner's padding left out.
pub fn value_range(voxels: &[f32], padding: Option<f32>) -> [f32; 2] {
    voxels
        .iter()
        .filter(|&&v| Some(v) != padding)
        .fold([f32::INFINITY, f32::NEG_INFINITY], |[lo, hi], &v| {
            [lo.min(v), hi.max(v)]
        })
}

/// Why values in `range` cannot be a chest CT in HU (no air, or nothing denser than water), if
/// they cannot.
pub fn not_chest_ct_hu(range: [f32; 2]) -> Option<String> {
    (range[1] < 0.0 || range[0] > -500.0).then(|| {
        format!(
            "values {:.0}..{:.0} do not look like HU of a chest CT (air is -1000)",
            range[0], range[1]
        )
    })
}

/// The axial planes (z of a canonical volume) that hold any label.
pub fn labelled_planes(labels: &Volume<u8>) -> Vec<usize> {
    (0..labels.geometry.size[2])
        .filter(|&z| labels.plane(z).iter().any(|&l| l != 0))
        .collect()
}

/// The 2D training slices of a case: every labelled axial plane, windowed, at its own size.
pub fn training_slices(
    id: &str,
    image: &Volume<f32>,
    intensity: Intensity,
    labels: &Volume<u8>,
    window: &Window,
) -> Vec<Slice> {
    let [width, height, _] = image.geometry.size;
    // Only the planes that become slices are windowed, not the whole volume.
    labelled_planes(labels)
        .into_iter()
        .map(|z| Slice {
            name: if image.geometry.size[2] == 1 {
                id.to_string()
            } else {
                format!("{id}#{z}")
            },
            width,
            height,
            image: windowed(image.plane(z), intensity, window),
            mask: labels.plane(z).to_vec(),
        })
        .collect()
}

/// A volume resampled onto a grid of `spacing` mm covering the same extent: trilinear for
/// intensities. Returns the new size with the voxels.
pub fn resample_linear(volume: &Volume<f32>, spacing: [f64; 3]) -> ([usize; 3], Vec<f32>) {
    let (size, coordinates) = resampled_grid(volume, spacing);
    let [nx, ny, nz] = volume.geometry.size;
    let at = |x: usize, y: usize, z: usize| volume.voxels[x + nx * (y + ny * z)];
    let mut out = Vec::with_capacity(size.iter().product());
    for &(z0, z1, tz) in &coordinates[2] {
        for &(y0, y1, ty) in &coordinates[1] {
            for &(x0, x1, tx) in &coordinates[0] {
                let lerp = |a: f32, b: f32, t: f32| a + (b - a) * t;
                let plane = |z| {
                    lerp(
                        lerp(at(x0, y0, z), at(x1, y0, z), tx),
                        lerp(at(x0, y1, z), at(x1, y1, z), tx),
                        ty,
                    )
                };
                out.push(lerp(plane(z0), plane(z1), tz));
            }
        }
    }
    let _ = nz;
    (size, out)
}

/// Labels resampled onto a grid of `spacing` mm: nearest neighbour, so no label is invented.
pub fn resample_nearest(labels: &Volume<u8>, spacing: [f64; 3]) -> ([usize; 3], Vec<u8>) {
    let (size, coordinates) = resampled_grid(labels, spacing);
    let [nx, ny, _] = labels.geometry.size;
    let mut out = Vec::with_capacity(size.iter().product());
    let nearest = |(a, b, t): (usize, usize, f32)| if t < 0.5 { a } else { b };
    for &z in &coordinates[2] {
        for &y in &coordinates[1] {
            for &x in &coordinates[0] {
                out.push(labels.voxels[nearest(x) + nx * (nearest(y) + ny * nearest(z))]);
            }
        }
    }
    (size, out)
}

/// For each axis, each new voxel's two neighbours in the old grid and the weight of the second.
type AxisSamples = Vec<(usize, usize, f32)>;

fn resampled_grid<T>(volume: &Volume<T>, spacing: [f64; 3]) -> ([usize; 3], [AxisSamples; 3]) {
    let g = &volume.geometry;
    let size: [usize; 3] = std::array::from_fn(|a| {
        let extent = g.spacing[a] * g.size[a] as f64;
        ((extent / spacing[a]).round() as usize).max(1)
    });
    let coordinates = std::array::from_fn(|a| {
        (0..size[a])
            .map(|i| {
                // Centres of the new voxels, in old voxel indices, over the same extent.
                let old = ((i as f64 + 0.5) * spacing[a] / g.spacing[a] - 0.5)
                    .clamp(0.0, (g.size[a] - 1) as f64);
                let lo = old.floor() as usize;
                let hi = (lo + 1).min(g.size[a] - 1);
                (lo, hi, (old - lo as f64) as f32)
            })
            .collect()
    });
    (size, coordinates)
}

/// A cubic patch for a 3D model: `side`^3 intensities in [0, 1] and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    pub image: Vec<f32>,
    pub mask: Vec<u8>,
}

/// Draws `count` patches of `side` voxels from an (already resampled) volume: with probability
/// `foreground` centred on a labelled voxel (lesions are rare; uniform patches would mostly
/// show background), otherwise anywhere. Volumes smaller than a patch are padded with 0.
pub fn sample_patches(
    size: [usize; 3],
    intensities: &[u8],
    labels: &[u8],
    side: usize,
    count: usize,
    foreground: f64,
    rng: &mut impl Rng,
) -> Vec<Patch> {
    let labelled: Vec<usize> = labels
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != 0)
        .map(|(i, _)| i)
        .collect();
    let [nx, ny, nz] = size;
    (0..count)
        .map(|_| {
            let centre = if !labelled.is_empty() && rng.random_bool(foreground) {
                let i = labelled[rng.random_range(0..labelled.len())];
                [i % nx, (i / nx) % ny, i / (nx * ny)]
            } else {
                [
                    rng.random_range(0..nx),
                    rng.random_range(0..ny),
                    rng.random_range(0..nz),
                ]
            };
            // Keep the patch inside the volume where the volume is big enough.
            let start: [i64; 3] = std::array::from_fn(|a| {
                let n = size[a] as i64;
                let s = side as i64;
                if n <= s {
                    0
                } else {
                    (centre[a] as i64 - s / 2).clamp(0, n - s)
                }
            });
            let mut image = vec![0.0; side * side * side];
            let mut mask = vec![0; side * side * side];
            for z in 0..side {
                for y in 0..side {
                    for x in 0..side {
                        let [sx, sy, sz] = [x, y, z].map(|v| v as i64);
                        let (px, py, pz) = (start[0] + sx, start[1] + sy, start[2] + sz);
                        if px >= nx as i64 || py >= ny as i64 || pz >= nz as i64 {
                            continue;
                        }
                        let from = px as usize + nx * (py as usize + ny * pz as usize);
                        let to = x + side * (y + side * z);
                        image[to] = intensities[from] as f32 / 255.0;
                        mask[to] = labels[from];
                    }
                }
            }
            Patch { image, mask }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;
    use rand::SeedableRng;

    fn volume<T: Copy>(size: [usize; 3], spacing: [f64; 3], voxels: Vec<T>) -> Volume<T> {
        Volume::new(
            Geometry {
                size,
                spacing,
                origin: [0.0; 3],
                direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            },
            voxels,
        )
        .unwrap()
    }

    #[test]
    fn lung_window_maps_its_ends_and_clips() {
        let w = Window::LUNG;
        assert_eq!(w.apply(-1350.0), 0);
        assert_eq!(w.apply(150.0), 255);
        assert_eq!(w.apply(-3024.0), 0);
        assert_eq!(w.apply(3000.0), 255);
        assert_eq!(w.apply(-600.0), 128);
        assert!(Window::new(0.0, 0.0).is_err());
        assert!(Window::new(f32::NAN, 10.0).is_err());
    }

    #[test]
    fn padding_becomes_air_and_png_values_pass_through() {
        let v = volume([3, 1, 1], [1.0; 3], vec![-3024.0, -1000.0, 40.0]);
        let hu = windowed(
            &v.voxels,
            Intensity::Hounsfield {
                padding: Some(-3024.0),
            },
            &Window::new(-1000.0, 2.0).unwrap(),
        );
        // Padding reads as air, the window's centre.
        assert_eq!(hu[0], hu[1]);
        let png = windowed(&[0.0, 200.0], Intensity::Windowed8Bit, &Window::LUNG);
        assert_eq!(png, vec![0, 200]);
    }

    #[test]
    fn only_labelled_planes_become_slices() {
        let image = volume([2, 2, 3], [1.0; 3], vec![0.0; 12]);
        let labels = volume(
            [2, 2, 3],
            [1.0; 3],
            vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 3],
        );
        let slices = training_slices(
            "c",
            &image,
            Intensity::Hounsfield { padding: None },
            &labels,
            &Window::LUNG,
        );
        assert_eq!(
            slices.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["c#1", "c#2"]
        );
        assert_eq!(slices[1].mask, vec![0, 0, 0, 3]);
    }

    #[test]
    fn resampling_keeps_extent_values_and_labels() {
        // 4 x 1 x 2 voxels of 1 x 1 x 3 mm onto 2 mm: 2 x 1 x 3.
        let image = volume(
            [4, 1, 2],
            [1.0, 1.0, 3.0],
            vec![0.0, 10.0, 20.0, 30.0, 0.0, 10.0, 20.0, 30.0],
        );
        let (size, out) = resample_linear(&image, [2.0; 3]);
        assert_eq!(size, [2, 1, 3]);
        assert_eq!(&out[..2], &[5.0, 25.0]);
        let labels = volume([4, 1, 2], [1.0, 1.0, 3.0], vec![0, 0, 2, 2, 1, 1, 0, 0]);
        let (_, out) = resample_nearest(&labels, [2.0; 3]);
        assert!(out.iter().all(|l| [0, 1, 2].contains(l)));
        assert_eq!(&out[..2], &[0, 2]);
    }

    #[test]
    fn foreground_patches_hold_labels_and_have_the_right_size() {
        let size = [20, 20, 20];
        let mut labels = vec![0u8; 8000];
        labels[10 + 20 * (10 + 20 * 10)] = 1;
        let intensities = vec![255u8; 8000];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let patches = sample_patches(size, &intensities, &labels, 8, 5, 1.0, &mut rng);
        assert_eq!(patches.len(), 5);
        for p in &patches {
            assert_eq!(p.image.len(), 512);
            assert!(p.mask.contains(&1));
            assert!(p.image.iter().all(|&v| v == 1.0));
        }
        // A volume smaller than the patch is padded, not refused.
        let small = sample_patches([2, 2, 2], &[255; 8], &[0; 8], 4, 1, 0.5, &mut rng);
        assert_eq!(small[0].image.iter().filter(|&&v| v == 1.0).count(), 8);
    }
}
