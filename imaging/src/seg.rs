//! DICOM Segmentation objects (BINARY and FRACTIONAL) painted onto the grid of the CT series
//! they were drawn on. Each frame is placed by its own Plane Position in patient space, so the
//! order of frames in the file does not matter; a frame off the series' grid is an error, never
//! resampled silently.

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::ReadError;
use crate::dicom::{floats, open_full_object, text, uint};
use crate::volume::{Geometry, Volume, dot};

/// How far (in voxels) a frame's pixel centre may sit from a voxel centre of the series.
const GRID_TOLERANCE_VOXELS: f64 = 0.05;

/// Reads the segmentation at `path` onto `grid`, the canonical grid of the series whose
/// Series Instance UID is `series_uid`. A voxel's value is the number of the segment covering
/// it (0: none; where segments overlap, the higher number).
pub fn read_seg(path: &Path, grid: &Geometry, series_uid: &str) -> Result<Volume<u16>, ReadError> {
    let obj = open_full_object(path)?;
    let err = |message: String| ReadError::new(path, message);
    if text(&obj, tags::MODALITY).as_deref() != Some("SEG") {
        return Err(err("not a DICOM Segmentation (Modality is not SEG)".into()));
    }
    let kind = text(&obj, tags::SEGMENTATION_TYPE).unwrap_or_default();
    let referenced = obj
        .get(tags::REFERENCED_SERIES_SEQUENCE)
        .and_then(|e| e.items())
        .into_iter()
        .flatten()
        .filter_map(|item| text(item, tags::SERIES_INSTANCE_UID))
        .collect::<Vec<_>>();
    if !referenced.is_empty() && !referenced.iter().any(|uid| uid == series_uid) {
        return Err(err(
            "drawn on another series (its Referenced Series is not this image's series)".into(),
        ));
    }
    let rows = uint(&obj, tags::ROWS, path, "Rows")?.unwrap_or(0);
    let columns = uint(&obj, tags::COLUMNS, path, "Columns")?.unwrap_or(0);
    let frames = uint(&obj, tags::NUMBER_OF_FRAMES, path, "Number of Frames")?.unwrap_or(1);
    if rows == 0 || columns == 0 || frames == 0 {
        return Err(err(
            "no frames (Rows, Columns or Number of Frames is 0)".into()
        ));
    }
    let bits = uint(&obj, tags::BITS_ALLOCATED, path, "Bits Allocated")?.unwrap_or(0);
    let pixels = obj
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| err("no Pixel Data".into()))?
        .to_bytes()
        .map_err(|_| {
            err("compressed (encapsulated) segmentation pixel data is not supported".into())
        })?;
    let frame_pixels = rows
        .checked_mul(columns)
        .ok_or_else(|| err("Rows x Columns overflows".into()))?;
    let total = frame_pixels
        .checked_mul(frames)
        .ok_or_else(|| err("frame count overflows".into()))?;
    let present: Box<dyn Fn(usize) -> bool> = match (kind.as_str(), bits) {
        ("BINARY", 1) => {
            if pixels.len() < total.div_ceil(8) {
                return Err(err(format!(
                    "pixel data holds {} bytes, {frames} frames of {columns}x{rows} bits need {}",
                    pixels.len(),
                    total.div_ceil(8)
                )));
            }
            // Bits run on across frame boundaries, least significant first.
            let pixels = pixels.clone();
            Box::new(move |i| pixels[i / 8] >> (i % 8) & 1 == 1)
        }
        ("FRACTIONAL", 8) => {
            if pixels.len() < total {
                return Err(err(format!(
                    "pixel data holds {} bytes, {frames} frames of {columns}x{rows} need {total}",
                    pixels.len()
                )));
            }
            let max = uint(
                &obj,
                tags::MAXIMUM_FRACTIONAL_VALUE,
                path,
                "Maximum Fractional Value",
            )?
            .unwrap_or(255)
            .max(1) as f64;
            let pixels = pixels.clone();
            // A voxel belongs to the segment when at least half of it does.
            Box::new(move |i| pixels[i] as f64 >= max / 2.0)
        }
        (kind, bits) => {
            return Err(err(format!(
                "Segmentation Type {kind:?} with {bits} bits allocated is not supported (BINARY with 1 bit or FRACTIONAL with 8)"
            )));
        }
    };
    let shared = obj
        .get(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.first());
    let per_frame = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .ok_or_else(|| err("no Per-frame Functional Groups".into()))?;
    if per_frame.len() != frames {
        return Err(err(format!(
            "{} per-frame groups for {frames} frames",
            per_frame.len()
        )));
    }
    let mut labels = vec![0u16; grid.voxel_count()];
    for (frame, groups) in per_frame.iter().enumerate() {
        let find = |sequence| {
            nested(groups, sequence).or_else(|| shared.and_then(|s| nested(s, sequence)))
        };
        let frame_err = |what: &str| err(format!("frame {}: {what}", frame + 1));
        let segment = find(tags::SEGMENT_IDENTIFICATION_SEQUENCE)
            .and_then(|item| {
                uint(
                    item,
                    tags::REFERENCED_SEGMENT_NUMBER,
                    path,
                    "Referenced Segment Number",
                )
                .ok()
                .flatten()
            })
            .filter(|&n| (1..=u16::MAX as usize).contains(&n))
            .ok_or_else(|| frame_err("no Referenced Segment Number"))? as u16;
        let position: [f64; 3] = frame_values(
            find(tags::PLANE_POSITION_SEQUENCE),
            tags::IMAGE_POSITION_PATIENT,
            "Image Position (Patient)",
            path,
            frame,
        )?;
        let orientation: [f64; 6] = frame_values(
            find(tags::PLANE_ORIENTATION_SEQUENCE),
            tags::IMAGE_ORIENTATION_PATIENT,
            "Image Orientation (Patient)",
            path,
            frame,
        )?;
        let spacing: [f64; 2] = frame_values(
            find(tags::PIXEL_MEASURES_SEQUENCE),
            tags::PIXEL_SPACING,
            "Pixel Spacing",
            path,
            frame,
        )?;
        // Where the frame's first pixel and its steps along a row and down a column land in
        // the series' voxel indices.
        let start = continuous_index(grid, position);
        let row_step = index_step(
            grid,
            [orientation[0], orientation[1], orientation[2]],
            spacing[1],
        );
        let column_step = index_step(
            grid,
            [orientation[3], orientation[4], orientation[5]],
            spacing[0],
        );
        let off_grid = || {
            frame_err(&format!(
                "not on the series' grid (a {columns}x{rows} frame at {position:?}); resample it onto the CT first"
            ))
        };
        let start = integral(start).ok_or_else(off_grid)?;
        let row_step = integral(row_step)
            .filter(|s| is_unit(*s))
            .ok_or_else(off_grid)?;
        let column_step = integral(column_step)
            .filter(|s| is_unit(*s))
            .ok_or_else(off_grid)?;
        for r in 0..rows {
            for c in 0..columns {
                if !present(frame * frame_pixels + r * columns + c) {
                    continue;
                }
                // Wide enough for a start anywhere an i64 reaches, as a far-off frame's does.
                let index: [i128; 3] = std::array::from_fn(|a| {
                    i128::from(start[a])
                        + c as i128 * i128::from(row_step[a])
                        + r as i128 * i128::from(column_step[a])
                });
                let inside =
                    (0..3).all(|a| index[a] >= 0 && (index[a] as u128) < grid.size[a] as u128);
                if !inside {
                    return Err(frame_err("reaches outside the series' volume"));
                }
                let [x, y, z] = index.map(|i| i as usize);
                let voxel = &mut labels[x + grid.size[0] * (y + grid.size[1] * z)];
                *voxel = (*voxel).max(segment);
            }
        }
    }
    Volume::new(grid.clone(), labels).map_err(|e| err(e.to_string()))
}

/// A numeric attribute of a frame's functional group; its absence is an error naming the frame.
fn frame_values<const N: usize>(
    group: Option<&InMemDicomObject>,
    tag: dicom_core::Tag,
    name: &str,
    path: &Path,
    frame: usize,
) -> Result<[f64; N], ReadError> {
    group
        .map(|item| floats(item, tag, path, name))
        .transpose()?
        .flatten()
        .ok_or_else(|| ReadError::new(path, format!("frame {}: no {name}", frame + 1)))
}

fn nested(item: &InMemDicomObject, sequence: dicom_core::Tag) -> Option<&InMemDicomObject> {
    obj_items(item, sequence).and_then(|items| items.first())
}

fn obj_items(item: &InMemDicomObject, sequence: dicom_core::Tag) -> Option<&[InMemDicomObject]> {
    item.get(sequence).and_then(|e| e.items())
}

fn continuous_index(grid: &Geometry, position: [f64; 3]) -> [f64; 3] {
    let offset: [f64; 3] = std::array::from_fn(|c| position[c] - grid.origin[c]);
    std::array::from_fn(|a| dot(offset, grid.direction[a]) / grid.spacing[a])
}

fn index_step(grid: &Geometry, direction: [f64; 3], length: f64) -> [f64; 3] {
    std::array::from_fn(|a| dot(direction, grid.direction[a]) * length / grid.spacing[a])
}

fn integral(v: [f64; 3]) -> Option<[i64; 3]> {
    v.iter()
        .all(|c| (c - c.round()).abs() <= GRID_TOLERANCE_VOXELS)
        .then(|| v.map(|c| c.round() as i64))
}

fn is_unit(step: [i64; 3]) -> bool {
    step.iter().map(|s| s.abs()).sum::<i64>() == 1
}
