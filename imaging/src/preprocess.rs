//! From volumes to what the model sees, one path for every format: HU through a window to
//! 8-bit intensities (the form PNG slice sets already have), axial slices that hold labels for
//! 2D models, resized to the model's input by `SliceDataset::at_size`.

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

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("a window needs a finite center and a positive width (got center {center}, width {width})")]
pub struct BadWindow {
    pub center: f32,
    pub width: f32,
}

impl Window {
    /// The usual lung window (-1350..150 HU): parenchyma, GGO and consolidation all stay apart.
    pub const LUNG: Window = Window {
        center: -600.0,
        width: 1500.0,
    };

    pub fn new(center: f32, width: f32) -> Result<Self, BadWindow> {
        if !center.is_finite() || !width.is_finite() || width <= 0.0 {
            return Err(BadWindow { center, width });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

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
}
