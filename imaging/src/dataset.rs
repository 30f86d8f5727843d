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

use crate::preprocess::Window;
use crate::scan::{has_extension, is_dicom_file, is_nifti};

mod case;
mod load;

pub use case::{
    CaseData, CaseReport, CaseSummary, Problem, Severity, check_case, read_case, read_mapped_case,
};
pub use load::{Loaded, Purpose, load};

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
