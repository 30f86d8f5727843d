//! A site's dataset: the description (`dataset.toml`), reading each case whatever its format,
//! checking it, and turning it into training slices. Problems are collected case by case, so a
//! site sees everything that is wrong in one pass.
//!
//! ```toml
//! # Which values of the site's label files mean what (defaults: Alveolus' own scheme 0..3).
//! [labels]
//! ggo = [1]
//! consolidation = [2]
//! lung = [10, 11, 12, 13, 14]
//! background = [0]
//! unlisted = "error"        # or "background": values listed nowhere count as background
//!
//! [window]                   # HU window applied before training (default: lung window)
//! center = -600
//! width = 1500
//!
//! [[case]]
//! id = "case-001"
//! image = "ct/case-001"      # a DICOM series folder, a .nii/.nii.gz file, a DICOM file or a PNG
//! labels = "seg/case-001.nii.gz"   # NIfTI, DICOM SEG or PNG label file
//! split = "train"            # train (default), validation or test
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ReadError;
use crate::png_slices::read_png_plane;
use crate::preprocess::{Intensity, Window, labelled_planes, not_chest_ct_hu, value_range};
use crate::scan::{Scan, Source, has_extension, is_dicom_file, is_nifti, read_scan};
use crate::slices::{Slice, SliceDataset};
use crate::volume::Volume;
use crate::{nifti, seg};

/// The file a dataset folder is described by.
pub const DESCRIPTION_FILE: &str = "dataset.toml";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {message}", path.display())]
    Description { path: PathBuf, message: String },
    #[error("{}", bad_cases_message(.cases, *.total))]
    BadCases {
        /// Reports of the cases with errors.
        cases: Vec<CaseReport>,
        /// How many cases the dataset has, to put the failures in proportion.
        total: usize,
    },
    #[error("{}: no usable {purpose} case{}", path.display(), if *skipped > 0 { format!(" ({skipped} skipped for errors)") } else { String::new() })]
    Empty {
        path: PathBuf,
        purpose: &'static str,
        skipped: usize,
    },
    #[error(
        "{}: not a dataset: expected a dataset.toml, a folder with images/ and masks/, a DICOM series folder, a NIfTI file or a DICOM file",
        .0.display()
    )]
    Unrecognised(PathBuf),
}

fn bad_cases_message(cases: &[CaseReport], total: usize) -> String {
    let mut text = format!(
        "{} of {total} cases have errors (`alveolus data validate` lists every problem; `--skip-bad-cases` trains without them):",
        cases.len()
    );
    for case in cases.iter().take(10) {
        for problem in case
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
        {
            text.push_str(&format!("\n  {}: {}", case.id, problem.message));
        }
    }
    if cases.len() > 10 {
        text.push_str(&format!("\n  ... and {} more cases", cases.len() - 10));
    }
    text
}

/// What a dataset is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The `train` split only.
    Training,
    /// The `validation` split only: what a site measures each round's model on.
    Validation,
    /// Every case, whatever its split (the data given is the data to measure on).
    Evaluation,
}

/// A dataset's usable slices, and what was left out or looks odd, for the site to read.
#[derive(Debug)]
pub struct Loaded {
    pub slices: SliceDataset,
    /// Cases the slices come from: what a site may say of its validation data.
    pub cases: usize,
    /// Cases left out for errors (only with `skip_bad_cases`).
    pub skipped: Vec<CaseReport>,
    /// Used cases with warnings.
    pub warned: Vec<CaseReport>,
}

pub fn load(path: &Path, purpose: Purpose, skip_bad_cases: bool) -> Result<Loaded, DatasetError> {
    let spec = DatasetSpec::open(path)?;
    let cases: Vec<&CaseSpec> = spec
        .cases
        .iter()
        .filter(|c| match purpose {
            Purpose::Training => c.split == Split::Train,
            Purpose::Validation => c.split == Split::Validation,
            Purpose::Evaluation => true,
        })
        .collect();
    let total = cases.len();
    let (mut slices, mut skipped, mut warned) = (Vec::new(), Vec::new(), Vec::new());
    let mut used = 0;
    for case in cases {
        let (report, case_slices) = check_case(&spec, case, true);
        if !report.usable() {
            skipped.push(report);
            continue;
        }
        slices.extend(case_slices.unwrap_or_default());
        used += 1;
        if !report.problems.is_empty() {
            warned.push(report);
        }
    }
    if !skipped.is_empty() && !skip_bad_cases {
        return Err(DatasetError::BadCases {
            cases: skipped,
            total,
        });
    }
    if slices.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
            purpose: match purpose {
                Purpose::Training => "training",
                Purpose::Validation => "validation",
                Purpose::Evaluation => "labelled",
            },
            skipped: skipped.len(),
        });
    }
    Ok(Loaded {
        cases: used,
        slices: SliceDataset { slices },
        skipped,
        warned,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[default]
    Train,
    Validation,
    Test,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        })
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "validation" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            other => Err(format!(
                "`{other}` is not a split: train, validation or test"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unlisted {
    /// A value the map does not name is a problem of the case (the usual mistake: a label file
    /// from another scheme).
    #[default]
    Error,
    /// Every value not listed is background (label files with many organs, e.g.
    /// TotalSegmentator's).
    Background,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelMapFile {
    #[serde(default = "background_values")]
    background: Vec<u16>,
    #[serde(default)]
    ggo: Vec<u16>,
    #[serde(default)]
    consolidation: Vec<u16>,
    #[serde(default)]
    lung: Vec<u16>,
    #[serde(default)]
    unlisted: Unlisted,
}

fn background_values() -> Vec<u16> {
    vec![0]
}

/// Site label values to Alveolus' dataset labels (0 background, 1 GGO, 2 consolidation, 3 lung).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    /// Each listed site value and the dataset label it means.
    values: BTreeMap<u16, u8>,
    unlisted: Unlisted,
}

impl Default for LabelMap {
    fn default() -> Self {
        Self {
            values: (0..4).map(|v| (v, v as u8)).collect(),
            unlisted: Unlisted::Error,
        }
    }
}

impl LabelMap {
    fn from_file(file: LabelMapFile) -> Result<Self, String> {
        let mut values = BTreeMap::new();
        for (label, list) in [
            (0u8, &file.background),
            (1, &file.ggo),
            (2, &file.consolidation),
            (3, &file.lung),
        ] {
            for &value in list {
                if let Some(previous) = values.insert(value, label)
                    && previous != label
                {
                    return Err(format!(
                        "[labels]: value {value} is listed as both {} and {}",
                        LABEL_NAMES[previous as usize], LABEL_NAMES[label as usize]
                    ));
                }
            }
        }
        Ok(Self {
            values,
            unlisted: file.unlisted,
        })
    }

    /// The dataset label of a site value; None where the value is listed nowhere and unlisted
    /// values are errors.
    pub fn map(&self, value: u16) -> Option<u8> {
        match (self.values.get(&value), self.unlisted) {
            (Some(&label), _) => Some(label),
            (None, Unlisted::Background) => Some(0),
            (None, Unlisted::Error) => None,
        }
    }
}

/// Names of the dataset labels, in label order, as reports print them.
pub const LABEL_NAMES: [&str; 4] = ["background", "ggo", "consolidation", "lung"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    id: String,
    image: PathBuf,
    #[serde(default)]
    labels: Option<PathBuf>,
    #[serde(default)]
    split: Split,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFile {
    center: f32,
    width: f32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptionFile {
    labels: Option<LabelMapFile>,
    window: Option<WindowFile>,
    #[serde(default, rename = "case")]
    cases: Vec<CaseFile>,
}

/// One case: an image and, for training, its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseSpec {
    /// Shown in local reports only; never sent (ids may carry site-internal numbers).
    pub id: String,
    pub image: PathBuf,
    pub labels: Option<PathBuf>,
    pub split: Split,
}

/// What a dataset was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A `dataset.toml`.
    Description,
    /// A folder of PNG slices (`images/`, `masks/`).
    PngFolder,
    /// One image (a DICOM series folder or file, a NIfTI file), as a dataset of one case.
    Single,
}

/// A dataset, resolved: paths absolute, label map and window checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// What the site pointed at (a description file or a folder/file taken as a dataset).
    pub source: PathBuf,
    pub kind: SourceKind,
    pub cases: Vec<CaseSpec>,
    pub labels: LabelMap,
    pub window: Window,
}

impl DatasetSpec {
    /// A dataset from a description file, a folder holding `dataset.toml`, a PNG slice folder
    /// (`images/` + `masks/`), a DICOM series folder, or a single NIfTI or DICOM file (an image
    /// without labels, for `data validate` to describe).
    pub fn open(path: &Path) -> Result<Self, DatasetError> {
        if path.is_dir() {
            let description = path.join(DESCRIPTION_FILE);
            if description.is_file() {
                return Self::from_description(&description);
            }
            if path.join("images").is_dir() {
                return Self::png_folder(path);
            }
            return Ok(Self::single(path));
        }
        if !path.exists() {
            return Err(DatasetError::Description {
                path: path.to_path_buf(),
                message: "no such file or folder".into(),
            });
        }
        if has_extension(path, "toml") {
            return Self::from_description(path);
        }
        if is_nifti(path) || has_extension(path, "dcm") || is_dicom_file(path) {
            return Ok(Self::single(path));
        }
        Err(DatasetError::Unrecognised(path.to_path_buf()))
    }

    fn single(path: &Path) -> Self {
        Self {
            source: path.to_path_buf(),
            kind: SourceKind::Single,
            cases: vec![CaseSpec {
                id: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "volume".into()),
                image: path.to_path_buf(),
                labels: None,
                split: Split::Train,
            }],
            labels: LabelMap::default(),
            window: Window::LUNG,
        }
    }

    fn png_folder(dir: &Path) -> Result<Self, DatasetError> {
        let images = dir.join("images");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
            .map_err(|e| DatasetError::Description {
                path: images.clone(),
                message: e.to_string(),
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| has_extension(p, "png"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DatasetError::Description {
                path: images,
                message: "no PNG slices".into(),
            });
        }
        let cases = files
            .into_iter()
            .map(|image| {
                let name = image
                    .file_name()
                    .expect("listed files have names")
                    .to_owned();
                CaseSpec {
                    id: image
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    labels: Some(dir.join("masks").join(name)),
                    image,
                    split: Split::Train,
                }
            })
            .collect();
        Ok(Self {
            source: dir.to_path_buf(),
            kind: SourceKind::PngFolder,
            cases,
            labels: LabelMap::default(),
            window: Window::LUNG,
        })
    }

    fn from_description(path: &Path) -> Result<Self, DatasetError> {
        let error = |message: String| DatasetError::Description {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let file: DescriptionFile = toml::from_str(&text).map_err(|e| error(e.to_string()))?;
        let root = path.parent().unwrap_or(Path::new("."));
        let labels = match file.labels {
            Some(map) => LabelMap::from_file(map).map_err(error)?,
            None => LabelMap::default(),
        };
        let window = match file.window {
            Some(w) => {
                Window::new(w.center, w.width).map_err(|e| error(format!("[window]: {e}")))?
            }
            None => Window::LUNG,
        };
        if file.cases.is_empty() {
            return Err(error("no [[case]] entries".into()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut cases = Vec::with_capacity(file.cases.len());
        for case in file.cases {
            if case.id.trim().is_empty() {
                return Err(error("a [[case]] has an empty id".into()));
            }
            if !seen.insert(case.id.clone()) {
                return Err(error(format!("case id {:?} is used twice", case.id)));
            }
            cases.push(CaseSpec {
                id: case.id,
                image: root.join(case.image),
                labels: case.labels.map(|l| root.join(l)),
                split: case.split,
            });
        }
        Ok(Self {
            source: path.to_path_buf(),
            kind: SourceKind::Description,
            cases,
            labels,
            window,
        })
    }
}

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
