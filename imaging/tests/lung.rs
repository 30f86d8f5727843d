//! The lung mask from HU on a real CT: TotalSegmentator's example (abdomen and lung bases, 3 mm),
//! against its lobes, which stand for the lung.

use std::path::{Path, PathBuf};

use alveolus_imaging::lung::{LEFT_LUNG, RIGHT_LUNG, lungs_from_hu};
use alveolus_imaging::nifti;

fn readers(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/readers")
        .join(path)
}

#[test]
fn lungs_from_hu_match_totalsegmentators_lobes() {
    let image = nifti::read_image(&readers("nifti/totalseg_example_ct_sm.nii.gz")).unwrap();
    let labels = nifti::read_labels(&readers("nifti/totalseg_example_seg.nii.gz")).unwrap();
    assert!(labels.geometry.same_grid(&image.geometry));
    let sides = lungs_from_hu(&image, None).unwrap();
    // TotalSegmentator v2: 10..14 are the five lobes (upper and lower left; upper, middle and
    // lower right).
    let truth: Vec<bool> = labels
        .voxels
        .iter()
        .map(|l| (10..=14).contains(l))
        .collect();
    let found: Vec<bool> = sides.voxels.iter().map(|&s| s != 0).collect();
    let both = truth.iter().zip(&found).filter(|(t, f)| **t && **f).count();
    let dice = 2.0 * both as f64
        / (truth.iter().filter(|t| **t).count() + found.iter().filter(|f| **f).count()) as f64;
    assert!(dice >= 0.95, "lung Dice {dice:.4}");
    // Sides: TotalSegmentator's 10, 11 are the left lobes, 12..14 the right ones.
    let agree = labels
        .voxels
        .iter()
        .zip(&sides.voxels)
        .filter(|&(&l, &s)| {
            (matches!(l, 10 | 11) && s == LEFT_LUNG) || (matches!(l, 12..=14) && s == RIGHT_LUNG)
        })
        .count();
    let lobes = truth.iter().filter(|t| **t).count();
    assert!(
        agree as f64 >= 0.95 * both as f64,
        "{agree} of {both} lung voxels on the right side ({lobes} lobe voxels)"
    );
    eprintln!("TotalSegmentator example: lung Dice {dice:.4}");
}
