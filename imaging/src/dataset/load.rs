//! A dataset's split, loaded for what it is read for: every case checked, the usable ones cut
//! into slices, the others refused or (when the site says so) skipped.

use std::path::Path;

use super::{CaseReport, CaseSpec, DatasetError, DatasetSpec, Split, check_case};
use crate::slices::SliceDataset;

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
