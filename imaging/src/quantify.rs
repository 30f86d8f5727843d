//! What a clinician reads off a segmentation: volumes of each lung and of its lesions in mL,
//! and the percentage of each lung the lesions take (involvement). Volumes are voxel counts of
//! the written label volume times the voxel volume, nothing interpolated, so that anyone can
//! recount them from `labels.nii.gz` and `lungs.nii.gz`.

use serde::Serialize;

use crate::lung::{LEFT_LUNG, RIGHT_LUNG};
use crate::segment::{CONSOLIDATION, GROUND_GLASS, LUNG, LungMethod, Segmentation};

/// Volumes of one lung (or both together, or the whole scan where there is no lung mask).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Region {
    /// The lung with its lesions; `None` where there is no lung mask.
    pub lung_ml: Option<f64>,
    pub ggo_ml: f64,
    pub consolidation_ml: f64,
    /// GGO and consolidation together.
    pub lesion_ml: f64,
    /// Lesion over lung, in percent; `None` where there is no lung mask or no lung.
    pub involvement_percent: Option<f64>,
}

/// Voxel counts behind a [`Region`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    lung: usize,
    ggo: usize,
    consolidation: usize,
}

impl Counts {
    fn add(&mut self, label: u8) {
        match label {
            GROUND_GLASS => self.ggo += 1,
            CONSOLIDATION => self.consolidation += 1,
            _ => {}
        }
        if matches!(label, GROUND_GLASS | CONSOLIDATION | LUNG) {
            self.lung += 1;
        }
    }

    fn region(&self, voxel_ml: f64, has_lungs: bool) -> Region {
        let lesion = self.ggo + self.consolidation;
        Region {
            lung_ml: has_lungs.then_some(self.lung as f64 * voxel_ml),
            ggo_ml: self.ggo as f64 * voxel_ml,
            consolidation_ml: self.consolidation as f64 * voxel_ml,
            lesion_ml: lesion as f64 * voxel_ml,
            involvement_percent: (has_lungs && self.lung > 0)
                .then(|| 100.0 * lesion as f64 / self.lung as f64),
        }
    }
}

/// The quantities of one segmented scan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantities {
    /// Voxel size along x, y, z of the canonical grid, in mm.
    pub voxel_spacing_mm: [f64; 3],
    /// One voxel, in mL. PNG slices have no physical size: their "mL" are pixels/1000 of a
    /// 1 mm grid and say nothing about the patient.
    pub voxel_volume_ml: f64,
    /// Where the lung mask came from; `None`: no lung mask.
    pub lung_mask: Option<LungMethod>,
    pub right_lung: Option<Region>,
    pub left_lung: Option<Region>,
    /// Both lungs together, or, without a lung mask, the whole scan (lesions only).
    pub total: Region,
    /// Lesion the model found that touches no lung, left out of every figure above.
    pub lesion_outside_lungs_ml: f64,
}

pub fn quantify(segmentation: &Segmentation) -> Quantities {
    let geometry = &segmentation.labels.geometry;
    let voxel_ml = geometry.spacing.iter().product::<f64>() / 1000.0;
    let labels = &segmentation.labels.voxels;
    let outside = segmentation.lesion_voxels_outside_lungs as f64 * voxel_ml;
    match &segmentation.lungs {
        Some(lungs) => {
            let (mut right, mut left) = (Counts::default(), Counts::default());
            for (&label, &side) in labels.iter().zip(&lungs.voxels) {
                match side {
                    RIGHT_LUNG => right.add(label),
                    LEFT_LUNG => left.add(label),
                    _ => {}
                }
            }
            let total = Counts {
                lung: right.lung + left.lung,
                ggo: right.ggo + left.ggo,
                consolidation: right.consolidation + left.consolidation,
            };
            Quantities {
                voxel_spacing_mm: geometry.spacing,
                voxel_volume_ml: voxel_ml,
                lung_mask: segmentation.lung_method,
                right_lung: Some(right.region(voxel_ml, true)),
                left_lung: Some(left.region(voxel_ml, true)),
                total: total.region(voxel_ml, true),
                lesion_outside_lungs_ml: outside,
            }
        }
        None => {
            let mut all = Counts::default();
            for &label in labels {
                all.add(label);
            }
            Quantities {
                voxel_spacing_mm: geometry.spacing,
                voxel_volume_ml: voxel_ml,
                lung_mask: None,
                right_lung: None,
                left_lung: None,
                total: all.region(voxel_ml, false),
                lesion_outside_lungs_ml: outside,
            }
        }
    }
}

impl Quantities {
    /// The report as a few lines for the terminal.
    pub fn render(&self) -> String {
        let [sx, sy, sz] = self.voxel_spacing_mm;
        let mut text = format!("voxels {sx:.3} x {sy:.3} x {sz:.3} mm\n");
        let line = |name: &str, r: &Region| {
            let lung = r
                .lung_ml
                .map(|v| format!("lung {v:8.1} mL  "))
                .unwrap_or_default();
            let involvement = r
                .involvement_percent
                .map(|p| format!("  involvement {p:5.1} %"))
                .unwrap_or_default();
            format!(
                "{name:<12} {lung}GGO {:7.1} mL  consolidation {:7.1} mL  lesions {:7.1} mL{involvement}\n",
                r.ggo_ml, r.consolidation_ml, r.lesion_ml
            )
        };
        if let (Some(right), Some(left)) = (&self.right_lung, &self.left_lung) {
            text.push_str(&line("right lung", right));
            text.push_str(&line("left lung", left));
            text.push_str(&line("both lungs", &self.total));
        } else {
            text.push_str(&line("whole scan", &self.total));
            text.push_str("no lung mask: involvement cannot be given\n");
        }
        if self.lesion_outside_lungs_ml > 0.0 {
            text.push_str(&format!(
                "{:.1} mL of predicted lesion touches no lung and is not counted\n",
                self.lesion_outside_lungs_ml
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Geometry, Volume};

    #[test]
    fn volumes_are_counts_times_the_voxel_volume_per_lung() {
        let geometry = Geometry {
            size: [4, 1, 1],
            spacing: [10.0, 10.0, 10.0],
            origin: [0.0; 3],
            direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        };
        let segmentation = Segmentation {
            labels: Volume {
                geometry: geometry.clone(),
                voxels: vec![LUNG, GROUND_GLASS, CONSOLIDATION, 0],
            },
            lungs: Some(Volume {
                geometry,
                voxels: vec![RIGHT_LUNG, RIGHT_LUNG, LEFT_LUNG, 0],
            }),
            lung_method: Some(LungMethod::Hu),
            lesion_voxels_outside_lungs: 1,
        };
        let q = quantify(&segmentation);
        assert_eq!(q.voxel_volume_ml, 1.0);
        let right = q.right_lung.unwrap();
        assert_eq!(right.lung_ml, Some(2.0));
        assert_eq!(right.ggo_ml, 1.0);
        assert_eq!(right.involvement_percent, Some(50.0));
        let left = q.left_lung.unwrap();
        assert_eq!(left.involvement_percent, Some(100.0));
        assert_eq!(q.total.lung_ml, Some(3.0));
        assert_eq!(q.total.lesion_ml, 2.0);
        assert_eq!(q.lesion_outside_lungs_ml, 1.0);
        assert!(q.render().contains("not counted"));
    }
}
