//! DICOM CT series: files grouped by Series Instance UID, slices ordered along the normal of
//! their Image Orientation by Image Position (never by file name or Instance Number), slice
//! spacing from those positions (Slice Thickness can differ from it), stored values rescaled to
//! HU. Compressed pixel data goes through dicom-pixeldata's pure-Rust codecs, except RLE and
//! JPEG-LS, which are decoded here (`pixels`, `jpegls`), also in pure Rust.

mod coded;
mod jpegls;
mod lengths;
mod pixels;

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};

use self::lengths::check_value_lengths;
use self::pixels::stored_values;
use crate::ReadError;
use crate::volume::{Geometry, Volume, cross, dot};

/// Modalities whose objects hold no CT voxels; a series folder may hold them (a SEG beside its
/// series) and they are not part of the image.
const NON_IMAGE_MODALITIES: [&str; 7] = ["SEG", "SR", "RTSTRUCT", "PR", "KO", "REG", "RTPLAN"];

/// Relative disagreement between slice gaps above which a series is called uneven (a missing
/// or duplicated slice, or a scout mixed in).
const SPACING_TOLERANCE: f64 = 0.01;

/// A CT volume in Hounsfield units.
#[derive(Debug, Clone)]
pub struct CtImage {
    pub volume: Volume<f32>,
    /// HU value the scanner wrote outside its field of view (DICOM Pixel Padding Value); those
    /// voxels are not tissue and are treated as air by preprocessing.
    pub padding_hu: Option<f32>,
    /// Modality as written in the files (None where the tag is absent); validation warns about
    /// anything other than CT.
    pub modality: Option<String>,
    /// Series Instance UID, to check that a segmentation was drawn on this series.
    pub series_uid: String,
    /// The slices as stored, for outputs that refer back to them.
    pub stack: SeriesStack,
}

/// A series' slices as stored, for outputs that refer back to them (a DICOM SEG names each
/// source image and places each frame where its image is).
#[derive(Debug, Clone)]
pub struct SeriesStack {
    /// The stored grid: x along Image Orientation's row direction (across a slice's columns),
    /// y along its column direction, z through the slices in the order of their position along
    /// the normal. The canonical volume is this grid with axes permuted and reversed.
    pub grid: Geometry,
    /// The image in each plane of `grid`, in order.
    pub instances: Vec<Instance>,
    /// Frame of Reference UID of the series (of its first image where they differ).
    pub frame_of_reference_uid: Option<String>,
}

/// One stored image of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub path: PathBuf,
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    /// Image Position (Patient) as the file says it.
    pub position: Option<[f64; 3]>,
}

/// What one file says about its place in the series, read without its pixels.
#[derive(Debug, Clone)]
pub(crate) struct SliceHeader {
    pub path: PathBuf,
    pub series_uid: String,
    pub modality: Option<String>,
    pub rows: usize,
    pub columns: usize,
    /// Row direction then column direction (Image Orientation (Patient)).
    pub orientation: Option<[f64; 6]>,
    pub position: Option<[f64; 3]>,
    /// Spacing between rows, then between columns.
    pub pixel_spacing: Option<[f64; 2]>,
    pub slice_thickness: Option<f64>,
    pub frames: usize,
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    pub frame_of_reference_uid: Option<String>,
}

pub(crate) fn open_header(path: &Path) -> Result<DefaultDicomObject, ReadError> {
    check_value_lengths(path, true)?;
    OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| ReadError::new(path, format!("not a readable DICOM file: {e}")))
}

pub(crate) fn open_full_object(path: &Path) -> Result<DefaultDicomObject, ReadError> {
    check_value_lengths(path, false)?;
    dicom_object::open_file(path)
        .map_err(|e| ReadError::new(path, format!("not a readable DICOM file: {e}")))
}

pub(crate) fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    let value = obj.get(tag)?.to_str().ok()?;
    let value = value.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!value.is_empty()).then(|| value.to_string())
}

pub(crate) fn floats<const N: usize>(
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    path: &Path,
    name: &str,
) -> Result<Option<[f64; N]>, ReadError> {
    let Some(element) = obj.get(tag) else {
        return Ok(None);
    };
    let values = element
        .to_multi_float64()
        .map_err(|e| ReadError::new(path, format!("{name} is not numeric: {e}")))?;
    let array: [f64; N] = values.as_slice().try_into().map_err(|_| {
        ReadError::new(
            path,
            format!("{name} has {} values, expected {N}", values.len()),
        )
    })?;
    if array.iter().any(|v| !v.is_finite()) {
        return Err(ReadError::new(path, format!("{name} is not finite")));
    }
    Ok(Some(array))
}

pub(crate) fn uint(
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    path: &Path,
    name: &str,
) -> Result<Option<usize>, ReadError> {
    match obj.get(tag) {
        None => Ok(None),
        Some(e) => e
            .to_int::<u32>()
            .map(|v| Some(v as usize))
            .map_err(|err| ReadError::new(path, format!("{name} is not a number: {err}"))),
    }
}

pub(crate) fn read_slice_header(
    path: &Path,
    obj: &DefaultDicomObject,
) -> Result<SliceHeader, ReadError> {
    let required = |name: &str, value: Option<usize>| {
        value
            .filter(|&v| v > 0)
            .ok_or_else(|| ReadError::new(path, format!("no {name}: not an image")))
    };
    Ok(SliceHeader {
        path: path.to_path_buf(),
        series_uid: text(obj, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
        modality: text(obj, tags::MODALITY),
        rows: required("Rows", uint(obj, tags::ROWS, path, "Rows")?)?,
        columns: required("Columns", uint(obj, tags::COLUMNS, path, "Columns")?)?,
        orientation: floats(
            obj,
            tags::IMAGE_ORIENTATION_PATIENT,
            path,
            "Image Orientation (Patient)",
        )?,
        position: floats(
            obj,
            tags::IMAGE_POSITION_PATIENT,
            path,
            "Image Position (Patient)",
        )?,
        pixel_spacing: floats(obj, tags::PIXEL_SPACING, path, "Pixel Spacing")?,
        slice_thickness: obj
            .get(tags::SLICE_THICKNESS)
            .and_then(|e| e.to_float64().ok())
            .filter(|v| v.is_finite() && *v > 0.0),
        frames: uint(obj, tags::NUMBER_OF_FRAMES, path, "Number of Frames")?.unwrap_or(1),
        sop_class_uid: text(obj, tags::SOP_CLASS_UID),
        sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID),
        frame_of_reference_uid: text(obj, tags::FRAME_OF_REFERENCE_UID),
    })
}

/// The DICOM files of a folder (not recursing; hidden files and DICOMDIR left out), or the one
/// file given.
pub fn dicom_files(path: &Path) -> Result<Vec<PathBuf>, ReadError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| ReadError::new(path, e.to_string()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            !name.starts_with('.') && name != "DICOMDIR"
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ReadError::new(path, "no files in this folder"));
    }
    Ok(files)
}

/// Reads the CT series in `path` (a folder of slices, or one file).
pub fn read_series(path: &Path) -> Result<CtImage, ReadError> {
    let mut headers = Vec::new();
    for file in dicom_files(path)? {
        let obj = open_header(&file)?;
        let header = read_slice_header(&file, &obj)?;
        if header
            .modality
            .as_deref()
            .is_some_and(|m| NON_IMAGE_MODALITIES.contains(&m))
        {
            continue;
        }
        headers.push(header);
    }
    let Some(first) = headers.first() else {
        return Err(ReadError::new(
            path,
            "no image files (only segmentations or reports)",
        ));
    };
    let series_uid = first.series_uid.clone();
    let mut series: Vec<&str> = headers.iter().map(|h| h.series_uid.as_str()).collect();
    series.sort();
    series.dedup();
    if series.len() > 1 {
        return Err(ReadError::new(
            path,
            format!(
                "holds {} series; put each series in a folder of its own",
                series.len()
            ),
        ));
    }
    let (geometry, order) = series_geometry(path, &headers)?;
    let mut voxels = Vec::new();
    let mut padding_hu = None;
    for &i in &order {
        let header = &headers[i];
        let (slice, padding) = read_hu(&header.path, header.rows * header.columns)?;
        if voxels.is_empty() {
            // Reserved from a slice actually read: the headers alone can promise 65535x65535
            // pixels a slice in a few hundred bytes.
            voxels.reserve_exact(slice.len().saturating_mul(order.len()));
        }
        if padding.is_some() {
            padding_hu = padding;
        }
        voxels.extend(slice);
    }
    let stack = SeriesStack {
        grid: geometry.clone(),
        instances: order
            .iter()
            .map(|&i| Instance {
                path: headers[i].path.clone(),
                sop_class_uid: headers[i].sop_class_uid.clone(),
                sop_instance_uid: headers[i].sop_instance_uid.clone(),
                position: headers[i].position,
            })
            .collect(),
        frame_of_reference_uid: headers[0].frame_of_reference_uid.clone(),
    };
    let volume = Volume::new(geometry, voxels).map_err(|e| ReadError::new(path, e.to_string()))?;
    Ok(CtImage {
        volume: volume.into_canonical(),
        padding_hu,
        modality: headers[0].modality.clone(),
        series_uid,
        stack,
    })
}

/// The grid of a stack of single-frame slices and the order (indices into `headers`) in which
/// they lie along the slice normal.
pub(crate) fn series_geometry(
    path: &Path,
    headers: &[SliceHeader],
) -> Result<(Geometry, Vec<usize>), ReadError> {
    let first = &headers[0];
    for h in headers {
        if h.frames != 1 {
            return Err(ReadError::new(
                &h.path,
                format!(
                    "multi-frame image ({} frames): only single-frame CT series are read",
                    h.frames
                ),
            ));
        }
        if (h.rows, h.columns) != (first.rows, first.columns) {
            return Err(ReadError::new(
                &h.path,
                format!(
                    "{}x{} pixels while {} has {}x{}",
                    h.columns,
                    h.rows,
                    first.path.display(),
                    first.columns,
                    first.rows
                ),
            ));
        }
    }
    let orientation = match first.orientation {
        Some(o) => o,
        None if headers.len() == 1 => [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        None => {
            return Err(ReadError::new(
                &first.path,
                "no Image Orientation (Patient): cannot order the slices",
            ));
        }
    };
    let row = unit([orientation[0], orientation[1], orientation[2]]);
    let column = unit([orientation[3], orientation[4], orientation[5]]);
    let (Some(row), Some(column)) = (row, column) else {
        return Err(ReadError::new(
            &first.path,
            "Image Orientation (Patient) has a zero vector",
        ));
    };
    if dot(row, column).abs() > 1e-3 {
        return Err(ReadError::new(
            &first.path,
            "Image Orientation (Patient) vectors are not perpendicular",
        ));
    }
    let normal = cross(row, column);
    for h in headers {
        if let Some(o) = h.orientation
            && (0..6).any(|i| (o[i] - orientation[i]).abs() > 1e-4)
        {
            return Err(ReadError::new(
                &h.path,
                "orientation differs from the rest of the series (a localizer mixed in?)",
            ));
        }
    }
    let pixel_spacing = first.pixel_spacing.unwrap_or([1.0, 1.0]);
    if pixel_spacing.iter().any(|&s| s <= 0.0) {
        return Err(ReadError::new(&first.path, "Pixel Spacing is not positive"));
    }
    let mut placed = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        match h.position {
            Some(p) => placed.push((dot(p, normal), i)),
            None if headers.len() == 1 => placed.push((0.0, i)),
            None => {
                return Err(ReadError::new(
                    &h.path,
                    "no Image Position (Patient): cannot place the slice",
                ));
            }
        }
    }
    placed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gaps: Vec<f64> = placed.windows(2).map(|w| w[1].0 - w[0].0).collect();
    if let Some(k) = gaps.iter().position(|&g| g < 1e-3) {
        return Err(ReadError::new(
            &headers[placed[k + 1].1].path,
            format!(
                "at the same position as {} (a duplicate slice or two series with one UID)",
                headers[placed[k].1].path.display()
            ),
        ));
    }
    let slice_spacing = if gaps.is_empty() {
        first.slice_thickness.unwrap_or(1.0)
    } else {
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let typical = sorted[sorted.len() / 2];
        if let Some(k) = gaps
            .iter()
            .position(|g| (g - typical).abs() > SPACING_TOLERANCE * typical)
        {
            return Err(ReadError::new(
                path,
                format!(
                    "uneven slice spacing: {typical:.4} mm between most slices but {:.4} mm between {} and {} (a missing slice?)",
                    gaps[k],
                    file_name(&headers[placed[k].1].path),
                    file_name(&headers[placed[k + 1].1].path),
                ),
            ));
        }
        // The mean over the whole stack is the least sensitive to rounded positions.
        (placed[placed.len() - 1].0 - placed[0].0) / gaps.len() as f64
    };
    let origin = headers[placed[0].1].position.unwrap_or([0.0; 3]);
    let geometry = Geometry {
        size: [first.columns, first.rows, headers.len()],
        spacing: [pixel_spacing[1], pixel_spacing[0], slice_spacing],
        origin,
        direction: [row, column, normal],
    };
    Ok((geometry, placed.into_iter().map(|(_, i)| i).collect()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn unit(v: [f64; 3]) -> Option<[f64; 3]> {
    let n = dot(v, v).sqrt();
    (n > 1e-6).then(|| v.map(|c| c / n))
}

/// One slice's voxels in HU, and the HU value of its padding, if it declares one.
fn read_hu(path: &Path, expected: usize) -> Result<(Vec<f32>, Option<f32>), ReadError> {
    let obj = open_full_object(path)?;
    let signed = uint(
        &obj,
        tags::PIXEL_REPRESENTATION,
        path,
        "Pixel Representation",
    )?
    .unwrap_or(0)
        == 1;
    let stored = stored_values(&obj, path, signed, expected)?;
    if stored.len() != expected {
        return Err(ReadError::new(
            path,
            format!(
                "pixel data holds {} values, the header promises {expected}",
                stored.len()
            ),
        ));
    }
    let number = |tag, default: f64| {
        obj.get(tag)
            .and_then(|e| e.to_float64().ok())
            .filter(|v| v.is_finite())
            .unwrap_or(default)
    };
    let slope = number(tags::RESCALE_SLOPE, 1.0);
    let intercept = number(tags::RESCALE_INTERCEPT, 0.0);
    let slope = if slope == 0.0 { 1.0 } else { slope };
    let padding = obj
        .get(tags::PIXEL_PADDING_VALUE)
        .and_then(|e| e.to_int::<i32>().ok())
        .map(|v| v as f64);
    // Pixel Padding Value is written with the VR of the pixels: as US it reads 63536 for -2000.
    let padding = padding.map(|p| {
        if signed && p >= 32768.0 {
            p - 65536.0
        } else {
            p
        }
    });
    let hu = stored
        .iter()
        .map(|&v| (v * slope + intercept) as f32)
        .collect();
    Ok((hu, padding.map(|p| (p * slope + intercept) as f32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length field damaged into gigabytes is refused from the bytes left in the file, before
    /// dicom-object allocates what it declares.
    #[test]
    fn a_value_longer_than_its_file_is_refused_before_it_is_read() {
        let real = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../data/readers/dicom/pydicom_CT_small.dcm"),
        )
        .unwrap();
        let pixel_data = real
            .windows(6)
            .position(|w| w == b"\xe0\x7f\x10\x00OW")
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let damaged = |name: &str, length_at: usize| {
            let mut bytes = real.clone();
            bytes[length_at..length_at + 4].copy_from_slice(&0xF000_0000u32.to_le_bytes());
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let declared = "declares a value of 4026531840 bytes";

        let pixels = damaged("pixels.dcm", pixel_data + 8);
        // The header stops before Pixel Data, as dicom-object's header read does.
        open_header(&pixels).unwrap();
        let err = read_series(&pixels).unwrap_err();
        assert!(
            err.message.contains(&format!("(7FE0,0010) {declared}")),
            "{err}"
        );

        // (0002,0001) in the file meta group, right after the group length.
        let meta = damaged("meta.dcm", 132 + 12 + 8);
        let err = open_header(&meta).unwrap_err();
        assert!(
            err.message.contains(&format!("(0002,0001) {declared}")),
            "{err}"
        );
    }
}
