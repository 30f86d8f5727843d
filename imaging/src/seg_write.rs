//! A segmentation as a DICOM Segmentation object (BINARY), the form PACS viewers and 3D Slicer
//! open beside the series it was made from: each frame one segment on one source image, placed
//! by that image's position and referring to it by SOP Instance UID, segments described by
//! SNOMED CT codes, the algorithm (and the model version) named.
//!
//! The object copies the patient and study attributes the standard requires from the source
//! series; like every output of `segment` it stays at the site.

use std::io;
use std::path::Path;

use dicom_core::value::{C, DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;

use crate::dicom::{SeriesStack, open_header, text};
use crate::dicom_write::{decimal, decimals, element, strs};
use crate::segment::{CONSOLIDATION, GROUND_GLASS, LUNG};
use crate::volume::Volume;

/// A coded concept: value, scheme, meaning.
type Code = (&'static str, &'static str, &'static str);

const MORPHOLOGICALLY_ABNORMAL: Code = ("49755003", "SCT", "Morphologically Abnormal Structure");
const ANATOMICAL_STRUCTURE: Code = ("91723000", "SCT", "Anatomical Structure");
const LUNG_CODE: Code = ("39607008", "SCT", "Lung");
const ARTIFICIAL_INTELLIGENCE: Code = ("123110", "DCM", "Artificial Intelligence");
const SEGMENTATION_DERIVATION: Code = ("113076", "DCM", "Segmentation");
const SOURCE_IMAGE_PURPOSE: Code = (
    "121322",
    "DCM",
    "Source image for image processing operation",
);

/// One segment of the object: its number is the dataset label it stands for.
struct Segment {
    label: u8,
    name: &'static str,
    category: Code,
    kind: Code,
    /// Where the finding is, for findings (not for the lung itself).
    region: Option<Code>,
}

const SEGMENTS: [Segment; 3] = [
    Segment {
        label: GROUND_GLASS,
        name: "Ground-glass opacity",
        category: MORPHOLOGICALLY_ABNORMAL,
        kind: ("1217294009", "SCT", "Ground glass opacity"),
        region: Some(LUNG_CODE),
    },
    Segment {
        label: CONSOLIDATION,
        name: "Consolidation",
        category: MORPHOLOGICALLY_ABNORMAL,
        kind: ("95436008", "SCT", "Lung consolidation"),
        region: Some(LUNG_CODE),
    },
    Segment {
        label: LUNG,
        name: "Lung without lesion",
        category: ANATOMICAL_STRUCTURE,
        kind: LUNG_CODE,
        region: None,
    },
];

/// Patient and study attributes copied from the source (Type 2 where empty is allowed).
const COPIED: [(Tag, VR); 10] = [
    (tags::PATIENT_NAME, VR::PN),
    (tags::PATIENT_ID, VR::LO),
    (tags::PATIENT_BIRTH_DATE, VR::DA),
    (tags::PATIENT_SEX, VR::CS),
    (tags::STUDY_DATE, VR::DA),
    (tags::STUDY_TIME, VR::TM),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    (tags::STUDY_ID, VR::SH),
    (tags::ACCESSION_NUMBER, VR::SH),
    (tags::POSITION_REFERENCE_INDICATOR, VR::LO),
];

/// What the object says about the model that made it.
pub struct Algorithm<'a> {
    /// sha256 of the model file (64 hex digits; AlgorithmVersion holds at most 64 characters).
    pub model_version: &'a str,
    /// Free text: round, run, class scheme, lung mask source.
    pub parameters: &'a str,
}

/// Why no SEG could be written for a series.
#[derive(Debug, thiserror::Error)]
pub enum SegWriteError {
    #[error("the series has no {0}, which a DICOM SEG must refer to")]
    MissingReference(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes `labels` (canonical grid) as a BINARY DICOM SEG of the series described by `stack`.
pub fn write_seg(
    path: &Path,
    labels: &Volume<u8>,
    stack: &SeriesStack,
    series_uid: &str,
    algorithm: &Algorithm,
) -> Result<(), SegWriteError> {
    let first = stack
        .instances
        .first()
        .ok_or(SegWriteError::MissingReference("images"))?;
    let references: Vec<(&str, &str)> = stack
        .instances
        .iter()
        .map(|i| match (&i.sop_class_uid, &i.sop_instance_uid) {
            (Some(class), Some(instance)) => Ok((class.as_str(), instance.as_str())),
            _ => Err(SegWriteError::MissingReference(
                "SOP Class and Instance UIDs on every image",
            )),
        })
        .collect::<Result<_, _>>()?;
    let frame_of_reference = stack
        .frame_of_reference_uid
        .as_deref()
        .ok_or(SegWriteError::MissingReference("Frame of Reference UID"))?;
    let source = open_header(&first.path).map_err(|e| io::Error::other(e.to_string()))?;
    let study_uid = text(&source, tags::STUDY_INSTANCE_UID)
        .ok_or(SegWriteError::MissingReference("Study Instance UID"))?;
    let on_stack = labels
        .on_grid(&stack.grid)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let [columns, rows, planes] = stack.grid.size;
    let (Ok(columns_u16), Ok(rows_u16)) = (u16::try_from(columns), u16::try_from(rows)) else {
        return Err(
            io::Error::new(io::ErrorKind::InvalidInput, "slices too large for DICOM").into(),
        );
    };

    let mut object = InMemDicomObject::new_empty();
    let now = time::OffsetDateTime::now_utc();
    let sop_instance_uid = fresh_uid();
    let dimension_uid = fresh_uid();
    let software = env!("CARGO_PKG_VERSION");
    for e in [
        element(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        element(tags::SOP_CLASS_UID, VR::UI, uids::SEGMENTATION_STORAGE),
        element(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid.as_str()),
        element(tags::STUDY_INSTANCE_UID, VR::UI, study_uid.as_str()),
        element(tags::SERIES_INSTANCE_UID, VR::UI, fresh_uid().as_str()),
        element(tags::MODALITY, VR::CS, "SEG"),
        element(tags::SERIES_NUMBER, VR::IS, "300"),
        element(tags::INSTANCE_NUMBER, VR::IS, "1"),
        element(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            format!(
                "Alveolus lung and lesions {}",
                &algorithm.model_version[..12.min(algorithm.model_version.len())]
            ),
        ),
        element(tags::FRAME_OF_REFERENCE_UID, VR::UI, frame_of_reference),
        element(tags::MANUFACTURER, VR::LO, "Alveolus"),
        element(tags::MANUFACTURER_MODEL_NAME, VR::LO, "alveolus segment"),
        element(tags::DEVICE_SERIAL_NUMBER, VR::LO, "0"),
        element(tags::SOFTWARE_VERSIONS, VR::LO, software),
        element(
            tags::CONTENT_DATE,
            VR::DA,
            format!(
                "{:04}{:02}{:02}",
                now.year(),
                u8::from(now.month()),
                now.day()
            ),
        ),
        element(
            tags::CONTENT_TIME,
            VR::TM,
            format!("{:02}{:02}{:02}", now.hour(), now.minute(), now.second()),
        ),
        element(tags::IMAGE_TYPE, VR::CS, strs(&["DERIVED", "PRIMARY"])),
        element(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        element(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        element(tags::ROWS, VR::US, rows_u16),
        element(tags::COLUMNS, VR::US, columns_u16),
        element(tags::BITS_ALLOCATED, VR::US, 1u16),
        element(tags::BITS_STORED, VR::US, 1u16),
        element(tags::HIGH_BIT, VR::US, 0u16),
        element(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
        element(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        element(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"),
        element(tags::CONTENT_LABEL, VR::CS, "LUNG_LESIONS"),
        element(
            tags::CONTENT_DESCRIPTION,
            VR::LO,
            "Lungs and COVID-19 lesions, automatic draft",
        ),
        element(tags::CONTENT_CREATOR_NAME, VR::PN, PrimitiveValue::Empty),
        element(tags::SEGMENTS_OVERLAP, VR::CS, "NO"),
    ] {
        object.put(e);
    }
    for (tag, vr) in COPIED {
        let value = text(&source, tag).unwrap_or_default();
        object.put(element(tag, vr, value));
    }
    object.put(sequence(
        tags::SEGMENT_SEQUENCE,
        SEGMENTS
            .iter()
            .map(|s| segment_item(s, algorithm))
            .collect(),
    ));
    object.put(sequence(
        tags::REFERENCED_SERIES_SEQUENCE,
        vec![item(vec![
            element(tags::SERIES_INSTANCE_UID, VR::UI, series_uid),
            sequence(
                tags::REFERENCED_INSTANCE_SEQUENCE,
                references
                    .iter()
                    .map(|&(class, instance)| {
                        item(vec![
                            element(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
                            element(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
                        ])
                    })
                    .collect(),
            ),
        ])],
    ));
    object.put(sequence(
        tags::DIMENSION_ORGANIZATION_SEQUENCE,
        vec![item(vec![element(
            tags::DIMENSION_ORGANIZATION_UID,
            VR::UI,
            dimension_uid.as_str(),
        )])],
    ));
    let dimension = |pointer: Tag, group: Tag, label: &str| {
        item(vec![
            element(
                tags::DIMENSION_ORGANIZATION_UID,
                VR::UI,
                dimension_uid.as_str(),
            ),
            element(
                tags::DIMENSION_INDEX_POINTER,
                VR::AT,
                PrimitiveValue::Tags(C::from_elem(pointer, 1)),
            ),
            element(
                tags::FUNCTIONAL_GROUP_POINTER,
                VR::AT,
                PrimitiveValue::Tags(C::from_elem(group, 1)),
            ),
            element(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
        ])
    };
    object.put(sequence(
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dimension(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "ReferencedSegmentNumber",
            ),
            dimension(
                tags::IMAGE_POSITION_PATIENT,
                tags::PLANE_POSITION_SEQUENCE,
                "ImagePositionPatient",
            ),
        ],
    ));
    let grid = &stack.grid;
    let [row_direction, column_direction, _] = grid.direction;
    object.put(sequence(
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![item(vec![
            sequence(
                tags::PLANE_ORIENTATION_SEQUENCE,
                vec![item(vec![element(
                    tags::IMAGE_ORIENTATION_PATIENT,
                    VR::DS,
                    decimals(&[
                        row_direction[0],
                        row_direction[1],
                        row_direction[2],
                        column_direction[0],
                        column_direction[1],
                        column_direction[2],
                    ]),
                )])],
            ),
            sequence(
                tags::PIXEL_MEASURES_SEQUENCE,
                vec![item(vec![
                    // Between rows first, then between columns.
                    element(
                        tags::PIXEL_SPACING,
                        VR::DS,
                        decimals(&[grid.spacing[1], grid.spacing[0]]),
                    ),
                    element(tags::SLICE_THICKNESS, VR::DS, decimal(grid.spacing[2])),
                    element(
                        tags::SPACING_BETWEEN_SLICES,
                        VR::DS,
                        decimal(grid.spacing[2]),
                    ),
                ])],
            ),
        ])],
    ));

    // Frames: segment by segment, planes in stack order, empty frames left out.
    let plane_len = columns * rows;
    let mut frames = Vec::new();
    let mut bits = BitWriter::default();
    for segment in &SEGMENTS {
        for k in 0..planes {
            let plane = &on_stack.voxels[k * plane_len..(k + 1) * plane_len];
            if !plane.contains(&segment.label) {
                continue;
            }
            bits.push_plane(plane, segment.label);
            frames.push(frame_item(segment, k, stack, &references));
        }
    }
    if frames.is_empty() {
        // A SEG needs a frame: an empty one says "nothing found" as well as none would.
        let segment = &SEGMENTS[2];
        bits.push_plane(&on_stack.voxels[..plane_len], segment.label);
        frames.push(frame_item(segment, 0, stack, &references));
    }
    object.put(element(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        frames.len().to_string(),
    ));
    object.put(sequence(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frames));
    object.put(element(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(C::from_vec(bits.finish())),
    ));

    let file = object
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .media_storage_sop_class_uid(uids::SEGMENTATION_STORAGE)
                .media_storage_sop_instance_uid(sop_instance_uid.as_str()),
        )
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    file.write_to_file(path)
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    Ok(())
}

fn frame_item(
    segment: &Segment,
    k: usize,
    stack: &SeriesStack,
    references: &[(&str, &str)],
) -> InMemDicomObject {
    let (class, instance) = references[k];
    let position = stack.instances[k]
        .position
        .unwrap_or_else(|| stack.grid.position([0.0, 0.0, k as f64]));
    item(vec![
        sequence(
            tags::DERIVATION_IMAGE_SEQUENCE,
            vec![item(vec![
                sequence(
                    tags::SOURCE_IMAGE_SEQUENCE,
                    vec![item(vec![
                        element(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
                        element(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
                        code_sequence(
                            tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                            SOURCE_IMAGE_PURPOSE,
                        ),
                        element(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"),
                    ])],
                ),
                code_sequence(tags::DERIVATION_CODE_SEQUENCE, SEGMENTATION_DERIVATION),
            ])],
        ),
        sequence(
            tags::FRAME_CONTENT_SEQUENCE,
            vec![item(vec![element(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                PrimitiveValue::U32(C::from_vec(vec![u32::from(segment.label), k as u32 + 1])),
            )])],
        ),
        sequence(
            tags::PLANE_POSITION_SEQUENCE,
            vec![item(vec![element(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                decimals(&position),
            )])],
        ),
        sequence(
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            vec![item(vec![element(
                tags::REFERENCED_SEGMENT_NUMBER,
                VR::US,
                u16::from(segment.label),
            )])],
        ),
    ])
}

fn segment_item(segment: &Segment, algorithm: &Algorithm) -> InMemDicomObject {
    let mut elements = vec![
        code_sequence(
            tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
            segment.category,
        ),
        element(tags::SEGMENT_NUMBER, VR::US, u16::from(segment.label)),
        element(tags::SEGMENT_LABEL, VR::LO, segment.name),
        sequence(
            tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
            vec![item(vec![
                code_sequence(
                    tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
                    ARTIFICIAL_INTELLIGENCE,
                ),
                element(tags::ALGORITHM_NAME, VR::LO, "Alveolus U-Net"),
                element(tags::ALGORITHM_VERSION, VR::LO, algorithm.model_version),
                element(tags::ALGORITHM_PARAMETERS, VR::LT, algorithm.parameters),
            ])],
        ),
        element(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
        element(tags::SEGMENT_ALGORITHM_NAME, VR::LO, "Alveolus U-Net"),
        code_sequence(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, segment.kind),
    ];
    if let Some(region) = segment.region {
        elements.push(code_sequence(tags::ANATOMIC_REGION_SEQUENCE, region));
    }
    item(elements)
}

fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn code_sequence(tag: Tag, (value, scheme, meaning): Code) -> DataElement<InMemDicomObject> {
    sequence(
        tag,
        vec![item(vec![
            element(tags::CODE_VALUE, VR::SH, value),
            element(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
            element(tags::CODE_MEANING, VR::LO, meaning),
        ])],
    )
}

/// A fresh `2.25.` UID: a random 122-bit number, unique without a registered root.
fn fresh_uid() -> String {
    let value: u128 = rand::random::<u128>() >> 6;
    format!("2.25.{value}")
}

/// BINARY pixel data: one bit per pixel, least significant bit first, running on across frame
/// boundaries; only the end is padded (to an even length, with zeros).
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    bits: usize,
}

impl BitWriter {
    fn push_plane(&mut self, plane: &[u8], label: u8) {
        self.bytes.reserve(plane.len() / 8 + 1);
        for &v in plane {
            if self.bits.is_multiple_of(8) {
                self.bytes.push(0);
            }
            if v == label {
                *self.bytes.last_mut().expect("a byte was pushed") |= 1 << (self.bits % 8);
            }
            self.bits += 1;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.bytes.len() % 2 == 1 {
            self.bytes.push(0);
        }
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_run_on_across_frames_least_significant_first() {
        let mut bits = BitWriter::default();
        bits.push_plane(&[1, 0, 1], 1);
        bits.push_plane(&[2, 2, 0, 0, 0, 0, 2], 2);
        // Bits 1 0 1 | 1 1 0 0 0 0 1: ten bits, two bytes, already an even length.
        assert_eq!(bits.finish(), vec![0b0001_1101, 0b0000_0010]);
    }
}
