//! One case of a dataset: read in whatever format it comes, checked (the image a chest CT,
//! the labels on its grid and named by the label map), and cut into training slices.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{CaseSpec, DatasetError, DatasetSpec, LabelMap, Split};
use crate::ReadError;
use crate::png_slices::read_png_plane;
use crate::preprocess::{Intensity, labelled_planes, not_chest_ct_hu, value_range};
use crate::scan::{Scan, Source, has_extension, is_nifti, read_scan};
use crate::slices::Slice;
use crate::volume::Volume;
use crate::{nifti, seg};

/// A case read from disk, before any check.
#[derive(Debug, Clone)]
pub struct CaseData {
    pub image: Volume<f32>,
    pub intensity: Intensity,
    /// DICOM Modality, where the image came from DICOM and says one.
    pub modality: Option<String>,
    /// The site's label values on the image's grid (not yet mapped).
    pub labels: Option<Volume<u16>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The case cannot be used.
    Error,
    /// The case is used, but someone should look.
    Warning,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

impl Problem {
    fn error(message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            message: message.into(),
        }
    }
    fn warning(message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            message: message.into(),
        }
    }
}

/// What a readable case holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseSummary {
    /// Voxels along x, y, z (canonical orientation: x to the patient's left, y posterior, z up).
    pub shape: [usize; 3],
    pub spacing_mm: [f64; 3],
    /// "HU" or "8-bit windowed".
    pub intensity: &'static str,
    /// Lowest and highest value, padding left out.
    pub range: [f32; 2],
    /// Axial slices holding any label (the slices a 2D model trains on).
    pub labelled_slices: usize,
    /// Fraction of voxels per dataset label (background, GGO, consolidation, lung), when labels
    /// exist and map cleanly.
    pub label_fractions: Option<[f64; 4]>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseReport {
    pub id: String,
    pub split: Split,
    pub image: PathBuf,
    pub labels: Option<PathBuf>,
    pub summary: Option<CaseSummary>,
    pub problems: Vec<Problem>,
}

impl CaseReport {
    pub fn usable(&self) -> bool {
        self.problems.iter().all(|p| p.severity != Severity::Error)
    }
}

/// Reads a case's image and labels, each in its own format.
pub fn read_case(case: &CaseSpec) -> Result<CaseData, ReadError> {
    let Scan {
        image,
        intensity,
        modality,
        source,
    } = read_scan(&case.image)?;
    let series_uid = match source {
        Source::Dicom { series_uid, .. } => Some(series_uid),
        Source::Nifti { .. } | Source::Png => None,
    };
    let labels = match &case.labels {
        None => None,
        Some(path) if is_nifti(path) => Some(nifti::read_labels(path)?),
        Some(path) if has_extension(path, "png") => Some(read_png_plane(path)?),
        Some(path) if path.is_file() => Some(seg::read_seg(
            path,
            &image.geometry,
            series_uid.as_deref().unwrap_or_default(),
        )?),
        Some(path) => return Err(ReadError::new(path, "no such label file")),
    };
    Ok(CaseData {
        image,
        intensity,
        modality,
        labels,
    })
}

/// Reads and checks one case; with `keep_slices`, also returns its training slices (windowed,
/// labels mapped) when it is usable.
pub fn check_case(
    dataset: &DatasetSpec,
    case: &CaseSpec,
    keep_slices: bool,
) -> (CaseReport, Option<Vec<Slice>>) {
    let mut report = CaseReport {
        id: case.id.clone(),
        split: case.split,
        image: case.image.clone(),
        labels: case.labels.clone(),
        summary: None,
        problems: Vec::new(),
    };
    let data = match read_case(case) {
        Ok(data) => data,
        Err(e) => {
            report.problems.push(Problem::error(e.to_string()));
            return (report, None);
        }
    };
    let problems = &mut report.problems;
    match (&data.intensity, data.modality.as_deref()) {
        (Intensity::Hounsfield { .. }, Some("CT")) | (Intensity::Windowed8Bit, _) => {}
        (Intensity::Hounsfield { .. }, Some(other)) => problems.push(Problem::error(format!(
            "modality is {other}, not CT: Hounsfield windows and the model assume CT"
        ))),
        (Intensity::Hounsfield { .. }, None) if is_nifti(&case.image) => {}
        (Intensity::Hounsfield { .. }, None) => problems.push(Problem::warning(
            "no Modality in the DICOM files; assumed to be CT",
        )),
    }
    let padding = match data.intensity {
        Intensity::Hounsfield { padding } => padding,
        Intensity::Windowed8Bit => None,
    };
    let range = value_range(&data.image.voxels, padding);
    if let Intensity::Hounsfield { .. } = data.intensity
        && let Some(why) = not_chest_ct_hu(range)
    {
        problems.push(Problem::warning(why));
    }
    let geometry = &data.image.geometry;
    let mut summary = CaseSummary {
        shape: geometry.size,
        spacing_mm: geometry.spacing,
        intensity: match data.intensity {
            Intensity::Hounsfield { .. } => "HU",
            Intensity::Windowed8Bit => "8-bit windowed",
        },
        range,
        labelled_slices: 0,
        label_fractions: None,
    };
    let mapped = match &data.labels {
        None => {
            if case.labels.is_none() && keep_slices {
                problems.push(Problem::error(
                    "no labels: a training case needs a label file",
                ));
            }
            None
        }
        Some(labels) if !labels.geometry.same_grid(geometry) => {
            problems.push(Problem::error(format!(
                "labels are on another grid: {:?} voxels of {:.4?} mm at {:.2?} against the image's {:?} of {:.4?} mm at {:.2?}",
                labels.geometry.size,
                labels.geometry.spacing,
                labels.geometry.origin,
                geometry.size,
                geometry.spacing,
                geometry.origin
            )));
            None
        }
        Some(labels) => map_labels(&dataset.labels, labels, problems),
    };
    if let Some(mapped) = &mapped {
        let mut counts = [0usize; 4];
        for &l in &mapped.voxels {
            counts[l as usize] += 1;
        }
        let total = mapped.voxels.len().max(1) as f64;
        summary.label_fractions = Some(counts.map(|c| c as f64 / total));
        let planes = labelled_planes(mapped);
        summary.labelled_slices = planes.len();
        if planes.is_empty() {
            problems.push(Problem::warning(
                "labels are empty (no lung, GGO or consolidation anywhere): nothing to train on",
            ));
        }
    }
    report.summary = Some(summary);
    let slices = match (keep_slices && report.usable(), mapped) {
        (true, Some(mapped)) => Some(crate::preprocess::training_slices(
            &case.id,
            &data.image,
            data.intensity,
            &mapped,
            &dataset.window,
        )),
        _ => None,
    };
    (report, slices)
}

/// A case read with its labels mapped to dataset labels (on the image's grid); `None` for a
/// case without labels. Any problem that would make the case unusable is an error naming it.
pub fn read_mapped_case(
    spec: &DatasetSpec,
    case: &CaseSpec,
) -> Result<Option<(CaseData, Volume<u8>)>, DatasetError> {
    let error = |message: String| DatasetError::Description {
        path: case.image.clone(),
        message: format!("case {}: {message}", case.id),
    };
    let data = read_case(case).map_err(|e| error(e.to_string()))?;
    let Some(labels) = &data.labels else {
        return Ok(None);
    };
    if !labels.geometry.same_grid(&data.image.geometry) {
        return Err(error("labels are on another grid".into()));
    }
    let mut problems = Vec::new();
    let mapped = map_labels(&spec.labels, labels, &mut problems).ok_or_else(|| {
        error(
            problems
                .into_iter()
                .map(|p| p.message)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(Some((data, mapped)))
}

fn map_labels(
    map: &LabelMap,
    labels: &Volume<u16>,
    problems: &mut Vec<Problem>,
) -> Option<Volume<u8>> {
    let mut unknown = BTreeMap::<u16, usize>::new();
    let voxels: Vec<u8> = labels
        .voxels
        .iter()
        .map(|&v| {
            map.map(v).unwrap_or_else(|| {
                *unknown.entry(v).or_default() += 1;
                0
            })
        })
        .collect();
    if !unknown.is_empty() {
        let listed: Vec<String> = unknown
            .iter()
            .take(8)
            .map(|(v, n)| format!("{v} ({n} voxels)"))
            .collect();
        problems.push(Problem::error(format!(
            "label values the [labels] map does not name: {}{}",
            listed.join(", "),
            if unknown.len() > 8 { ", ..." } else { "" }
        )));
        return None;
    }
    Some(Volume {
        geometry: labels.geometry.clone(),
        voxels,
    })
}
