//! The readers on real files (data/readers, see its PROVENANCE.md for the expected values) and
//! on broken ones.

use std::path::{Path, PathBuf};

use alveolus_imaging::dataset::{CaseSpec, DatasetSpec, Severity, Split, check_case};
use alveolus_imaging::dicom::read_series;
use alveolus_imaging::{nifti, seg};

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/readers")
        .join(path)
}

fn range(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

#[test]
fn ct_small_is_rescaled_to_hounsfield_units() {
    let ct = read_series(&data("dicom/pydicom_CT_small.dcm")).unwrap();
    assert_eq!(ct.volume.geometry.size, [128, 128, 1]);
    assert_eq!(ct.modality.as_deref(), Some("CT"));
    // Stored 128..2191 with intercept -1024.
    assert_eq!(range(&ct.volume.voxels), (-896.0, 1167.0));
}

#[test]
fn wg04_padding_is_known_and_left_out_of_the_range() {
    let ct = read_series(&data("dicom/nema_wg04_CT1_UNC.dcm")).unwrap();
    assert_eq!(ct.padding_hu, Some(-3024.0));
    let tissue: Vec<f32> = ct
        .volume
        .voxels
        .iter()
        .copied()
        .filter(|&v| v != -3024.0)
        .collect();
    let (lo, hi) = range(&tissue);
    assert_eq!(hi, 2278.0 - 1024.0);
    assert!(lo >= -1024.0, "{lo}");
    let spec = DatasetSpec::open(&data("dicom/nema_wg04_CT1_UNC.dcm")).unwrap();
    let (report, _) = check_case(&spec, &spec.cases[0], false);
    assert_eq!(report.summary.unwrap().range, [lo, hi]);
}

#[test]
fn three_slice_series_matches_its_nifti_conversion() {
    let ct = read_series(&data("dicom/ct3slice_liverseg")).unwrap();
    let g = &ct.volume.geometry;
    assert_eq!(g.size, [512, 512, 3]);
    assert!((g.spacing[0] - 0.810547).abs() < 1e-6 && (g.spacing[1] - 0.810547).abs() < 1e-6);
    assert!((g.spacing[2] - 1.0).abs() < 1e-6, "{:?}", g.spacing);
    let reference = nifti::read_image(&data("derived/ct3slice_hu.nii.gz")).unwrap();
    assert!(
        g.same_grid(&reference.geometry),
        "{g:?}\n{:?}",
        reference.geometry
    );
    assert_eq!(ct.volume.voxels, reference.voxels);
    assert_eq!(range(&ct.volume.voxels), (-3024.0, 1381.0));
}

#[test]
fn slices_are_ordered_by_position_not_by_file_name() {
    let dir = tempfile::tempdir().unwrap();
    // Names that sort the other way round.
    for (from, to) in [("01", "c"), ("02", "b"), ("03", "a")] {
        std::fs::copy(
            data(&format!("dicom/ct3slice_liverseg/{from}.dcm")),
            dir.path().join(to),
        )
        .unwrap();
    }
    let shuffled = read_series(dir.path()).unwrap();
    let original = read_series(&data("dicom/ct3slice_liverseg")).unwrap();
    assert_eq!(shuffled.volume, original.volume);
}

#[test]
fn liver_seg_lands_on_its_series_grid() {
    let ct = read_series(&data("dicom/ct3slice_liverseg")).unwrap();
    let mask = seg::read_seg(
        &data("dicom/ct3slice_liverseg/liver_seg.dcm"),
        &ct.volume.geometry,
        &ct.series_uid,
    )
    .unwrap();
    let reference = nifti::read_labels(&data("derived/ct3slice_liver_mask.nii.gz")).unwrap();
    assert!(mask.geometry.same_grid(&reference.geometry));
    assert_eq!(mask.voxels, reference.voxels);
    let per_slice = 512 * 512;
    for z in 0..3 {
        let fraction = mask.plane(z).iter().filter(|&&v| v == 1).count() as f64 / per_slice as f64;
        assert!((0.10..0.17).contains(&fraction), "slice {z}: {fraction}");
    }
    // Drawn on this series: another series UID is refused.
    let err = seg::read_seg(
        &data("dicom/ct3slice_liverseg/liver_seg.dcm"),
        &ct.volume.geometry,
        "1.2.3",
    )
    .unwrap_err();
    assert!(err.message.contains("another series"), "{err}");
}

#[test]
fn minimal_lidc_slices_load_without_modality() {
    let ct = read_series(&data("dicom/lidc_2slice_minimal")).unwrap();
    assert_eq!(ct.modality, None);
    let g = &ct.volume.geometry;
    assert_eq!(g.size, [512, 512, 2]);
    assert_eq!(g.spacing, [0.625, 0.625, 1.0]);
    assert_eq!(ct.volume.plane(0), ct.volume.plane(1));
    assert_eq!(range(&ct.volume.voxels), (-2048.0, 1502.0));
    let spec = DatasetSpec::open(&data("dicom/lidc_2slice_minimal")).unwrap();
    let (report, _) = check_case(&spec, &spec.cases[0], false);
    assert!(report.usable());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.severity == Severity::Warning && p.message.contains("Modality"))
    );
}

#[test]
fn totalsegmentator_pair_shares_a_grid_and_maps_lobes_to_lung() {
    let dir = tempfile::tempdir().unwrap();
    let description = dir.path().join("dataset.toml");
    std::fs::write(
        &description,
        format!(
            "[labels]\nlung = [10, 11, 12, 13, 14]\nunlisted = \"background\"\n\n[[case]]\nid = \"ts\"\nimage = {:?}\nlabels = {:?}\n",
            data("nifti/totalseg_example_ct_sm.nii.gz"),
            data("nifti/totalseg_example_seg.nii.gz")
        ),
    )
    .unwrap();
    let spec = DatasetSpec::open(&description).unwrap();
    let (report, slices) = check_case(&spec, &spec.cases[0], true);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let summary = report.summary.unwrap();
    assert_eq!(summary.spacing_mm, [3.0, 3.0, 3.0]);
    let lung = summary.label_fractions.unwrap()[3];
    // Abdomen and lung bases: the lobes are a small part of the volume.
    assert!(lung > 0.005, "{lung}");
    let slices = slices.unwrap();
    assert_eq!(slices.len(), summary.labelled_slices);
    assert!(
        slices
            .iter()
            .all(|s| s.mask.iter().all(|&l| l == 0 || l == 3))
    );
    // Without the map, TotalSegmentator's organ values are unknown labels: an error naming them.
    std::fs::write(
        &description,
        format!(
            "[[case]]\nid = \"ts\"\nimage = {:?}\nlabels = {:?}\n",
            data("nifti/totalseg_example_ct_sm.nii.gz"),
            data("nifti/totalseg_example_seg.nii.gz")
        ),
    )
    .unwrap();
    let spec = DatasetSpec::open(&description).unwrap();
    let (report, _) = check_case(&spec, &spec.cases[0], true);
    assert!(!report.usable());
    assert!(
        report.problems[0]
            .message
            .contains("label values the [labels] map does not name")
    );
}

fn case(image: PathBuf, labels: Option<PathBuf>) -> (DatasetSpec, CaseSpec) {
    let spec = DatasetSpec::open(&image).unwrap();
    let case = CaseSpec {
        id: "c".into(),
        image,
        labels,
        split: Split::Train,
    };
    (spec, case)
}

fn first_error(image: PathBuf, labels: Option<PathBuf>) -> String {
    let (spec, case) = case(image, labels);
    let (report, _) = check_case(&spec, &case, true);
    assert!(!report.usable(), "{report:?}");
    report
        .problems
        .iter()
        .find(|p| p.severity == Severity::Error)
        .unwrap()
        .message
        .clone()
}

#[test]
fn broken_inputs_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated DICOM file.
    let bytes = std::fs::read(data("dicom/pydicom_CT_small.dcm")).unwrap();
    let truncated = dir.path().join("truncated.dcm");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let message = first_error(truncated.clone(), None);
    assert!(message.contains("truncated.dcm"), "{message}");
    // Not DICOM at all.
    let garbage = dir.path().join("garbage.dcm");
    std::fs::write(&garbage, vec![7u8; 4000]).unwrap();
    let message = first_error(garbage, None);
    assert!(
        message.contains("garbage.dcm") && message.contains("DICOM"),
        "{message}"
    );
    // A mask of another grid: the liver mask of the 3-slice series against CT_small.
    let message = first_error(
        data("dicom/pydicom_CT_small.dcm"),
        Some(data("derived/ct3slice_liver_mask.nii.gz")),
    );
    assert!(message.contains("another grid"), "{message}");
    // A NIfTI with a wrong magic.
    let mut nii = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::MultiGzDecoder::new(
            std::fs::File::open(data("derived/ct3slice_liver_mask.nii.gz")).unwrap(),
        ),
        &mut nii,
    )
    .unwrap();
    nii[344..348].copy_from_slice(b"xyz\0");
    let bad = dir.path().join("bad.nii");
    std::fs::write(&bad, &nii).unwrap();
    let message = first_error(bad, None);
    assert!(message.contains("bad.nii"), "{message}");
}

/// Random corruptions of a real slice: errors or (when the damage misses what matters) a
/// volume, never a panic.
#[test]
fn corrupted_dicom_never_panics() {
    use rand::{Rng, SeedableRng};
    let original = std::fs::read(data("dicom/pydicom_CT_small.dcm")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slice.dcm");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..120 {
        let mut bytes = original.clone();
        // Headers hold the interesting fields: damage mostly the first 2 KiB.
        for _ in 0..rng.random_range(1..8) {
            let i = if rng.random_bool(0.8) {
                rng.random_range(0..2048)
            } else {
                rng.random_range(0..bytes.len())
            };
            bytes[i] = rng.random();
        }
        if rng.random_bool(0.3) {
            bytes.truncate(rng.random_range(0..bytes.len()));
        }
        std::fs::write(&path, &bytes).unwrap();
        let _ = read_series(&path);
    }
}

/// The transfer syntaxes CT archives hold, each made from pydicom_CT_small.dcm (lossless), read
/// back to the original's HU voxel for voxel.
#[test]
fn compressed_transfer_syntaxes_decode_losslessly() {
    let original = read_series(&data("dicom/pydicom_CT_small.dcm")).unwrap();
    for file in [
        "jpeg_lossless_sv1.dcm",
        "jpeg_ls_lossless.dcm",
        "rle.dcm",
        "jpeg2000_lossless.dcm",
        "deflated.dcm",
    ] {
        let decoded = read_series(&data(&format!("dicom/compressed/{file}")))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(decoded.volume, original.volume, "{file}");
    }
}

/// A FRACTIONAL copy of the liver SEG (made with pydicom: 150/200 inside the liver, 50/200 in a
/// band beside it) gives the binary SEG's voxels: a voxel belongs where at least half of it does.
#[test]
fn fractional_seg_is_cut_at_one_half() {
    let ct = read_series(&data("dicom/ct3slice_liverseg")).unwrap();
    let binary = seg::read_seg(
        &data("dicom/ct3slice_liverseg/liver_seg.dcm"),
        &ct.volume.geometry,
        &ct.series_uid,
    )
    .unwrap();
    let fractional = seg::read_seg(
        &data("dicom/liver_seg_fractional.dcm"),
        &ct.volume.geometry,
        &ct.series_uid,
    )
    .unwrap();
    assert_eq!(fractional, binary);
}

#[test]
fn a_series_with_a_missing_slice_is_refused() {
    use alveolus_imaging::dicom_write::{SeriesTags, write_series};
    let dir = tempfile::tempdir().unwrap();
    let case = alveolus_imaging::synth::chest_ct(1, [16, 16, 6], [20.0, 20.0, 5.0]);
    let files = write_series(dir.path(), &case.image, &SeriesTags::synthetic(1), "s").unwrap();
    let whole = read_series(dir.path()).unwrap();
    assert_eq!(whole.volume.geometry.size, [16, 16, 6]);
    assert_eq!(
        whole.volume.voxels,
        case.image
            .voxels
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>()
    );
    std::fs::remove_file(&files[3]).unwrap();
    let err = read_series(dir.path()).unwrap_err();
    assert!(
        err.message.contains("uneven slice spacing") && err.message.contains("missing slice"),
        "{err}"
    );
}

/// JPEG-LS slices of 8, 12 and 16 bits, lossless and near-lossless, with restart markers and
/// custom coding parameters (made with DCMTK and CharLS: data/readers/PROVENANCE.md), read
/// through the series reader: the HU of each voxel is the stored value CharLS decodes (the
/// `.u16` beside each file), rescaled as the header says.
#[test]
fn jpeg_ls_slices_read_as_charls_decodes_them() {
    use dicom_dictionary_std::tags;
    let dir = data("dicom/compressed/jpegls");
    for name in [
        "ls8_lossless",
        "ls8_restart",
        "ls12_lossless",
        "ls12_near3_lse",
        "ls16_lossless",
        "ls16_near2",
        "ls16_near1_restart",
    ] {
        let path = dir.join(format!("{name}.dcm"));
        let series = read_series(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let stored: Vec<u16> = std::fs::read(dir.join(format!("{name}.u16")))
            .unwrap()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let header = dicom_object::open_file(&path).unwrap();
        let number = |tag, default: f64| {
            header
                .element(tag)
                .ok()
                .and_then(|e| e.to_float64().ok())
                .unwrap_or(default)
        };
        let slope = number(tags::RESCALE_SLOPE, 1.0);
        let intercept = number(tags::RESCALE_INTERCEPT, 0.0);
        let bits_stored = number(tags::BITS_STORED, 16.0) as u32;
        let signed = number(tags::PIXEL_REPRESENTATION, 0.0) == 1.0;
        let expected: Vec<f32> = stored
            .iter()
            .map(|&v| {
                let v = i64::from(v);
                let v = if signed && v >= 1 << (bits_stored - 1) {
                    v - (1 << bits_stored)
                } else {
                    v
                };
                (v as f64 * slope + intercept) as f32
            })
            .collect();
        assert_eq!(series.volume.geometry.size, [112, 112, 1], "{name}");
        assert_eq!(series.volume.voxels, expected, "{name}");
    }
}
