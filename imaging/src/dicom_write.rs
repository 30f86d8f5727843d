//! Writes a HU volume as a DICOM CT series, one file per axial slice: how synthetic cases
//! become the same kind of input a site's PACS export is, and how tests get DICOM with known
//! content and known (fake) identifiers.
//!
//! File names deliberately do not follow the slices' order in space, nor do Instance Numbers:
//! real exports often don't either, and a reader must place slices by Image Position.

use std::io;
use std::path::{Path, PathBuf};

use dicom_core::value::{C, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;

use crate::volume::{cross, dot};
use crate::{Geometry, Volume};

/// Stored pixel = HU - this; written as Rescale Intercept so that HU -1024 is stored as 0.
const RESCALE_INTERCEPT: i32 = -1024;

/// The patient, study and series attributes every slice of a series shares.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesTags {
    /// Patient's Name (PN, e.g. `DOE^JANE`): identifying, must never leave the site.
    pub patient_name: String,
    /// Patient ID: identifying.
    pub patient_id: String,
    /// Patient's Birth Date (DA, `YYYYMMDD`): identifying.
    pub patient_birth_date: String,
    /// Patient's Sex (`F`, `M`, `O` or empty).
    pub patient_sex: String,
    /// Accession Number: identifies the examination in the hospital's systems.
    pub accession_number: String,
    /// Institution Name: identifies the site.
    pub institution_name: String,
    /// Referring Physician's Name (PN): identifies a person at the site.
    pub referring_physician_name: String,
    /// Study Instance UID: globally unique, so it links the files back to the hospital.
    pub study_instance_uid: String,
    /// Series Instance UID: what a reader groups slices by.
    pub series_instance_uid: String,
    /// Frame of Reference UID: slices (and segmentations) sharing it share patient space.
    pub frame_of_reference_uid: String,
    /// Study Date (DA, `YYYYMMDD`).
    pub study_date: String,
    /// Study Time (TM, `HHMMSS`).
    pub study_time: String,
    /// Study ID (SH), the scanner's short study number.
    pub study_id: String,
    /// Study Description (LO).
    pub study_description: String,
    /// Series Description (LO).
    pub series_description: String,
    /// Series Number: tells series of one study apart.
    pub series_number: u32,
    /// Manufacturer (LO) of the "scanner".
    pub manufacturer: String,
    /// Modality (CS): `CT`, or another to make a series that is not CT.
    pub modality: String,
}

impl SeriesTags {
    /// Plainly fake identifiers and fresh `2.25.` UIDs derived from `seed`: the same seed gives
    /// the same tags.
    pub fn synthetic(seed: u64) -> Self {
        Self {
            patient_name: format!("SYNTHETIC^CASE{seed}"),
            patient_id: format!("SYN{seed:06}"),
            patient_birth_date: "19700101".into(),
            patient_sex: "O".into(),
            accession_number: format!("ACC{seed:06}"),
            institution_name: "Alveolus Synthetic Phantom".into(),
            referring_physician_name: String::new(),
            study_instance_uid: uid_from(&[b"study", &seed.to_le_bytes()]),
            series_instance_uid: uid_from(&[b"series", &seed.to_le_bytes()]),
            frame_of_reference_uid: uid_from(&[b"frame", &seed.to_le_bytes()]),
            study_date: "20240101".into(),
            study_time: "120000".into(),
            study_id: format!("{}", seed % 100_000),
            study_description: "CT CHEST (synthetic)".into(),
            series_description: "Synthetic chest phantom".into(),
            series_number: 1,
            manufacturer: "Alveolus".into(),
            modality: "CT".into(),
        }
    }
}

/// Writes `volume` (HU) as one CT Image Storage file per slice, explicit VR little endian,
/// into `dir` (created if missing), named `{file_stem}{index:04}.dcm`. Stored values are
/// HU + 1024 clamped to 0..=65535 (unsigned 16 bits, Rescale Intercept -1024, Slope 1).
///
/// Returns the paths in spatial order: element `z` is the file holding slice `z`. File indices
/// and Instance Numbers follow a scrambled order (see [`file_order`]).
pub fn write_series(
    dir: &Path,
    volume: &Volume<i16>,
    series: &SeriesTags,
    file_stem: &str,
) -> io::Result<Vec<PathBuf>> {
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
    let g = &volume.geometry;
    if volume.voxels.len() != g.voxel_count() {
        return Err(invalid(format!(
            "{} voxels for a {:?} grid",
            volume.voxels.len(),
            g.size
        )));
    }
    let [columns, rows, slices] = g.size;
    let (Ok(columns_u16), Ok(rows_u16)) = (u16::try_from(columns), u16::try_from(rows)) else {
        return Err(invalid(format!(
            "a {columns}x{rows} slice does not fit DICOM's 16-bit Rows and Columns"
        )));
    };
    if columns == 0 || rows == 0 || slices == 0 {
        return Err(invalid(format!("an empty {:?} volume", g.size)));
    }
    let finite = g.is_finite();
    if !finite {
        return Err(invalid(format!("a non-finite geometry: {g:?}")));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;

    let shared = shared_elements(g, series, rows_u16, columns_u16);
    let mut paths = vec![PathBuf::new(); slices];
    for (index, z) in file_order(slices).into_iter().enumerate() {
        let path = dir.join(format!("{file_stem}{index:04}.dcm"));
        let sop_instance_uid = uid_from(&[
            b"sop",
            series.series_instance_uid.as_bytes(),
            &(z as u64).to_le_bytes(),
        ]);
        let mut object = InMemDicomObject::from_element_iter(shared.iter().cloned());
        let position = g.position([0.0, 0.0, z as f64]);
        let normal = cross(g.direction[0], g.direction[1]);
        let stored: Vec<u16> = volume
            .plane(z)
            .iter()
            .map(|&hu| (i32::from(hu) - RESCALE_INTERCEPT).clamp(0, 65535) as u16)
            .collect();
        for element in [
            element(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid.as_str()),
            element(tags::INSTANCE_NUMBER, VR::IS, (index + 1).to_string()),
            element(tags::IMAGE_POSITION_PATIENT, VR::DS, decimals(&position)),
            element(tags::SLICE_LOCATION, VR::DS, decimal(dot(position, normal))),
            element(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(C::from_vec(stored)),
            ),
        ] {
            object.put(element);
        }
        let file = object
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        file.write_to_file(&path)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        paths[z] = path;
    }
    Ok(paths)
}

/// Which slice each file holds: the even slices from the top down, then the odd ones. Neither
/// file-name order nor its reverse is spatial order once there are three slices or more.
pub fn file_order(slices: usize) -> Vec<usize> {
    let even = (0..slices).rev().filter(|z| z % 2 == 0);
    let odd = (0..slices).rev().filter(|z| z % 2 == 1);
    even.chain(odd).collect()
}

pub(crate) fn element(
    tag: Tag,
    vr: VR,
    value: impl Into<PrimitiveValue>,
) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, value.into())
}

/// The elements every slice of the series shares.
fn shared_elements(
    g: &Geometry,
    series: &SeriesTags,
    rows: u16,
    columns: u16,
) -> Vec<DataElement<InMemDicomObject>> {
    let [dx, dy] = [g.direction[0], g.direction[1]];
    vec![
        // UTF-8, so that any name a caller puts in the tags is written as given.
        element(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        element(
            tags::IMAGE_TYPE,
            VR::CS,
            strs(&["ORIGINAL", "PRIMARY", "AXIAL"]),
        ),
        element(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE),
        element(tags::STUDY_DATE, VR::DA, series.study_date.as_str()),
        element(tags::SERIES_DATE, VR::DA, series.study_date.as_str()),
        element(tags::STUDY_TIME, VR::TM, series.study_time.as_str()),
        element(
            tags::ACCESSION_NUMBER,
            VR::SH,
            series.accession_number.as_str(),
        ),
        element(tags::MODALITY, VR::CS, series.modality.as_str()),
        element(tags::MANUFACTURER, VR::LO, series.manufacturer.as_str()),
        element(
            tags::INSTITUTION_NAME,
            VR::LO,
            series.institution_name.as_str(),
        ),
        element(
            tags::REFERRING_PHYSICIAN_NAME,
            VR::PN,
            series.referring_physician_name.as_str(),
        ),
        element(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            series.study_description.as_str(),
        ),
        element(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            series.series_description.as_str(),
        ),
        element(tags::PATIENT_NAME, VR::PN, series.patient_name.as_str()),
        element(tags::PATIENT_ID, VR::LO, series.patient_id.as_str()),
        element(
            tags::PATIENT_BIRTH_DATE,
            VR::DA,
            series.patient_birth_date.as_str(),
        ),
        element(tags::PATIENT_SEX, VR::CS, series.patient_sex.as_str()),
        element(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
        element(tags::SLICE_THICKNESS, VR::DS, decimal(g.spacing[2])),
        element(tags::KVP, VR::DS, "120"),
        element(tags::PATIENT_POSITION, VR::CS, "HFS"),
        element(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            series.study_instance_uid.as_str(),
        ),
        element(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            series.series_instance_uid.as_str(),
        ),
        element(tags::STUDY_ID, VR::SH, series.study_id.as_str()),
        element(
            tags::SERIES_NUMBER,
            VR::IS,
            series.series_number.to_string(),
        ),
        element(
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            decimals(&[dx[0], dx[1], dx[2], dy[0], dy[1], dy[2]]),
        ),
        element(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            series.frame_of_reference_uid.as_str(),
        ),
        element(
            tags::POSITION_REFERENCE_INDICATOR,
            VR::LO,
            PrimitiveValue::Empty,
        ),
        element(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        element(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        element(tags::ROWS, VR::US, rows),
        element(tags::COLUMNS, VR::US, columns),
        // Row spacing (between rows, along y) first, then column spacing.
        element(
            tags::PIXEL_SPACING,
            VR::DS,
            decimals(&[g.spacing[1], g.spacing[0]]),
        ),
        element(tags::BITS_ALLOCATED, VR::US, 16u16),
        element(tags::BITS_STORED, VR::US, 16u16),
        element(tags::HIGH_BIT, VR::US, 15u16),
        element(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
        element(tags::WINDOW_CENTER, VR::DS, "-600"),
        element(tags::WINDOW_WIDTH, VR::DS, "1500"),
        element(
            tags::RESCALE_INTERCEPT,
            VR::DS,
            RESCALE_INTERCEPT.to_string(),
        ),
        element(tags::RESCALE_SLOPE, VR::DS, "1"),
        element(tags::RESCALE_TYPE, VR::LO, "HU"),
    ]
}

/// A multi-valued string value (`ORIGINAL\PRIMARY\AXIAL`).
pub(crate) fn strs(values: &[&str]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|s| s.to_string()).collect::<C<String>>())
}

/// A DS value: at most 16 characters, so as many decimals as fit.
pub(crate) fn decimal(value: f64) -> String {
    for precision in (0..=10).rev() {
        let mut s = format!("{value:.precision$}");
        if s.contains('.') {
            s.truncate(s.trim_end_matches('0').trim_end_matches('.').len());
        }
        if s == "-0" {
            s = "0".into();
        }
        if s.len() <= 16 {
            return s;
        }
    }
    // Only magnitudes beyond 1e15 mm get here; no geometry is that large.
    format!("{value:.6e}")
}

pub(crate) fn decimals(values: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|&v| decimal(v)).collect())
}

/// A `2.25.` UID (a UUID-sized number under the ISO root for them) from a hash of `parts`, so
/// that writing the same series twice gives the same UIDs.
fn uid_from(parts: &[&[u8]]) -> String {
    let mut high = 0xcbf2_9ce4_8422_2325_u64;
    let mut low = 0x8422_2325_cbf2_9ce4_u64;
    for part in parts {
        for &byte in part.iter().chain(&[0xff]) {
            high = (high ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
            low = (low ^ u64::from(byte))
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(17);
        }
    }
    let value = (u128::from(high) << 64) | u128::from(low);
    format!("2.25.{value}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_object::open_file;

    fn volume() -> Volume<i16> {
        // A small oblique grid: a few degrees about z.
        let (c, s) = (0.996195, 0.087156);
        let geometry = Geometry {
            size: [6, 5, 4],
            spacing: [0.7, 0.8, 2.5],
            origin: [-10.0, 20.5, -30.25],
            direction: [[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]],
        };
        let mut voxels: Vec<i16> = (0..geometry.voxel_count())
            .map(|i| (i as i16) * 37 - 1100)
            .collect();
        voxels[0] = -2000;
        voxels[1] = i16::MAX;
        voxels[2] = i16::MIN;
        Volume::new(geometry, voxels).unwrap()
    }

    fn fake_tags() -> SeriesTags {
        SeriesTags {
            patient_name: "SECRET^PATIENT^Ünïcode".into(),
            patient_id: "PID-LEAK-0001".into(),
            patient_birth_date: "19450607".into(),
            accession_number: "ACC-LEAK-42".into(),
            institution_name: "St Leak Hospital".into(),
            ..SeriesTags::synthetic(7)
        }
    }

    fn text(object: &dicom_object::DefaultDicomObject, tag: Tag) -> String {
        object.element(tag).unwrap().to_str().unwrap().into_owned()
    }

    fn floats(object: &dicom_object::DefaultDicomObject, tag: Tag) -> Vec<f64> {
        object.element(tag).unwrap().to_multi_float64().unwrap()
    }

    #[test]
    fn slices_read_back_with_their_tags_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let volume = volume();
        let series = fake_tags();
        let paths = write_series(&dir.path().join("series"), &volume, &series, "IM").unwrap();
        assert_eq!(paths.len(), 4);

        // Sorting by name gives neither spatial order nor its reverse.
        let mut by_name = paths.clone();
        by_name.sort();
        let mut reversed = paths.clone();
        reversed.reverse();
        assert_ne!(by_name, paths);
        assert_ne!(by_name, reversed);
        assert_eq!(
            by_name[0].file_name().unwrap().to_str().unwrap(),
            "IM0000.dcm"
        );

        let g = &volume.geometry;
        let mut instance_numbers = Vec::new();
        let mut sop_uids = Vec::new();
        for (z, path) in paths.iter().enumerate() {
            let object = open_file(path).unwrap();
            assert_eq!(
                object.meta().transfer_syntax(),
                uids::EXPLICIT_VR_LITTLE_ENDIAN
            );
            assert_eq!(
                object.meta().media_storage_sop_class_uid(),
                uids::CT_IMAGE_STORAGE
            );
            assert_eq!(text(&object, tags::SOP_CLASS_UID), uids::CT_IMAGE_STORAGE);
            assert_eq!(text(&object, tags::MODALITY), "CT");
            assert_eq!(text(&object, tags::PATIENT_NAME), series.patient_name);
            assert_eq!(text(&object, tags::PATIENT_ID), series.patient_id);
            assert_eq!(text(&object, tags::PATIENT_BIRTH_DATE), "19450607");
            assert_eq!(
                text(&object, tags::ACCESSION_NUMBER),
                series.accession_number
            );
            assert_eq!(
                text(&object, tags::INSTITUTION_NAME),
                series.institution_name
            );
            assert_eq!(
                text(&object, tags::STUDY_INSTANCE_UID),
                series.study_instance_uid
            );
            assert_eq!(
                text(&object, tags::SERIES_INSTANCE_UID),
                series.series_instance_uid
            );
            assert_eq!(
                text(&object, tags::FRAME_OF_REFERENCE_UID),
                series.frame_of_reference_uid
            );
            let sop = text(&object, tags::SOP_INSTANCE_UID);
            assert!(sop.len() <= 64 && sop.chars().all(|c| c.is_ascii_digit() || c == '.'));
            assert_eq!(sop, object.meta().media_storage_sop_instance_uid());
            sop_uids.push(sop);
            instance_numbers.push(
                object
                    .element(tags::INSTANCE_NUMBER)
                    .unwrap()
                    .to_int::<i32>()
                    .unwrap(),
            );

            let int = |tag| object.element(tag).unwrap().to_int::<u16>().unwrap();
            assert_eq!(int(tags::ROWS), 5);
            assert_eq!(int(tags::COLUMNS), 6);
            assert_eq!(int(tags::BITS_ALLOCATED), 16);
            assert_eq!(int(tags::BITS_STORED), 16);
            assert_eq!(int(tags::HIGH_BIT), 15);
            assert_eq!(int(tags::PIXEL_REPRESENTATION), 0);
            assert_eq!(int(tags::SAMPLES_PER_PIXEL), 1);
            assert_eq!(
                text(&object, tags::PHOTOMETRIC_INTERPRETATION),
                "MONOCHROME2"
            );
            assert_eq!(floats(&object, tags::RESCALE_INTERCEPT), [-1024.0]);
            assert_eq!(floats(&object, tags::RESCALE_SLOPE), [1.0]);
            assert_eq!(floats(&object, tags::PIXEL_SPACING), [0.8, 0.7]);
            assert_eq!(floats(&object, tags::SLICE_THICKNESS), [2.5]);
            let orientation = floats(&object, tags::IMAGE_ORIENTATION_PATIENT);
            let expected: Vec<f64> = g.direction[0]
                .iter()
                .chain(&g.direction[1])
                .copied()
                .collect();
            assert_eq!(orientation, expected);
            let position = floats(&object, tags::IMAGE_POSITION_PATIENT);
            let expected = g.position([0.0, 0.0, z as f64]);
            for a in 0..3 {
                assert!((position[a] - expected[a]).abs() < 1e-6, "{position:?}");
            }

            // The raw file holds Pixel Data as OW, little endian, HU + 1024 clamped.
            let expected: Vec<u8> = volume
                .plane(z)
                .iter()
                .flat_map(|&hu| ((i32::from(hu) + 1024).clamp(0, 65535) as u16).to_le_bytes())
                .collect();
            let bytes = std::fs::read(path).unwrap();
            let header = [0xe0, 0x7f, 0x10, 0x00, b'O', b'W', 0, 0];
            let at = bytes
                .windows(header.len())
                .position(|w| w == header)
                .expect("an OW Pixel Data element");
            let length = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(length as usize, expected.len());
            assert_eq!(&bytes[at + 12..at + 12 + expected.len()], &expected[..]);
            assert_eq!(
                object
                    .element(tags::PIXEL_DATA)
                    .unwrap()
                    .to_bytes()
                    .unwrap(),
                &expected[..]
            );
        }
        // Slice 0 holds the clamped extremes.
        let first = std::fs::read(&paths[0]).unwrap();
        assert!(first.windows(4).any(|w| w == [0, 0, 0xff, 0x83]));

        // Instance numbers are 1..=4 but not in spatial order; SOP Instance UIDs are distinct.
        let mut sorted = instance_numbers.clone();
        sorted.sort();
        assert_eq!(sorted, [1, 2, 3, 4]);
        assert_ne!(instance_numbers, sorted);
        sop_uids.sort();
        sop_uids.dedup();
        assert_eq!(sop_uids.len(), 4);
    }

    #[test]
    fn file_order_is_a_scrambled_permutation() {
        for n in 1..10 {
            let order = file_order(n);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            if n >= 3 {
                assert_ne!(order, sorted);
                assert_ne!(order, sorted.iter().rev().copied().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn values_fit_their_representations() {
        assert_eq!(decimal(0.810546994209289), "0.8105469942");
        assert_eq!(decimal(-123456.789), "-123456.789");
        assert_eq!(decimal(6.123e-17), "0");
        assert_eq!(decimal(-1e-12), "0");
        assert_eq!(decimal(2.0), "2");
        assert!(decimal(-98765432.125).len() <= 16);
        let uid = uid_from(&[b"x"]);
        assert!(uid.starts_with("2.25.") && uid.len() <= 64);
        assert_ne!(uid, uid_from(&[b"y"]));
    }

    #[test]
    fn unwritable_volumes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = volume();
        v.voxels.pop();
        assert!(write_series(dir.path(), &v, &fake_tags(), "x").is_err());
        let mut v = volume();
        v.geometry.origin[0] = f64::NAN;
        assert!(write_series(dir.path(), &v, &fake_tags(), "x").is_err());
    }
}
