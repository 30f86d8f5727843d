//! `alveolus data validate`: every case read and checked, each problem named with its file,
//! and a summary a site can compare with what it thinks it has. Local only.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::dataset::{CaseReport, DatasetError, DatasetSpec, LABEL_NAMES, Severity, check_case};

#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub source: PathBuf,
    pub cases: Vec<CaseReport>,
    pub summary: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub cases: usize,
    pub usable_cases: usize,
    pub cases_with_errors: usize,
    pub cases_with_warnings: usize,
    /// Axial slices with labels over the usable cases (what a 2D model trains on).
    pub labelled_slices: usize,
    /// Voxel-weighted label fractions over the usable labelled cases.
    pub label_fractions: Option<[f64; 4]>,
}

impl ValidationReport {
    /// Whether anything is left to train or infer on.
    pub fn any_usable(&self) -> bool {
        self.summary.usable_cases > 0
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "dataset {} ({} cases)",
            self.source.display(),
            self.cases.len()
        );
        for case in &self.cases {
            let status = if !case.usable() {
                "ERROR"
            } else if case.problems.is_empty() {
                "ok"
            } else {
                "warn"
            };
            let _ = write!(out, "{status:<5} {} ({})", case.id, case.split);
            if let Some(s) = &case.summary {
                let _ = write!(
                    out,
                    "  {}x{}x{} voxels, {:.3}x{:.3}x{:.3} mm, {} {:.0}..{:.0}",
                    s.shape[0],
                    s.shape[1],
                    s.shape[2],
                    s.spacing_mm[0],
                    s.spacing_mm[1],
                    s.spacing_mm[2],
                    s.intensity,
                    s.range[0],
                    s.range[1]
                );
                if let Some(f) = s.label_fractions {
                    let _ = write!(
                        out,
                        ", {} labelled slices, {}",
                        s.labelled_slices,
                        fractions(&f)
                    );
                }
            }
            out.push('\n');
            for problem in &case.problems {
                let kind = match problem.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                };
                let _ = writeln!(out, "      {kind}: {}", problem.message);
            }
        }
        let s = &self.summary;
        let _ = writeln!(
            out,
            "summary: {} cases, {} usable, {} with errors, {} with warnings; {} labelled slices{}",
            s.cases,
            s.usable_cases,
            s.cases_with_errors,
            s.cases_with_warnings,
            s.labelled_slices,
            s.label_fractions
                .map(|f| format!("; {}", fractions(&f)))
                .unwrap_or_default()
        );
        if !self.any_usable() {
            let _ = writeln!(out, "nothing usable remains");
        }
        out
    }
}

fn fractions(f: &[f64; 4]) -> String {
    LABEL_NAMES
        .iter()
        .zip(f)
        .map(|(name, v)| format!("{name} {:.2}%", v * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads and checks every case of the dataset at `path` (any form [`DatasetSpec::open`] takes).
pub fn validate(path: &Path) -> Result<ValidationReport, DatasetError> {
    let spec = DatasetSpec::open(path)?;
    let cases: Vec<CaseReport> = spec
        .cases
        .iter()
        .map(|case| check_case(&spec, case, false).0)
        .collect();
    let usable: Vec<&CaseReport> = cases.iter().filter(|c| c.usable()).collect();
    let mut weighted = [0.0; 4];
    let mut voxels = 0.0;
    for case in &usable {
        if let Some(s) = &case.summary
            && let Some(f) = s.label_fractions
        {
            let n = s.shape.iter().product::<usize>() as f64;
            for (w, v) in weighted.iter_mut().zip(f) {
                *w += v * n;
            }
            voxels += n;
        }
    }
    let summary = Summary {
        cases: cases.len(),
        usable_cases: usable.len(),
        cases_with_errors: cases.len() - usable.len(),
        cases_with_warnings: usable.iter().filter(|c| !c.problems.is_empty()).count(),
        labelled_slices: usable
            .iter()
            .filter_map(|c| c.summary.as_ref())
            .map(|s| s.labelled_slices)
            .sum(),
        label_fractions: (voxels > 0.0).then(|| weighted.map(|w| w / voxels)),
    };
    Ok(ValidationReport {
        source: spec.source,
        cases,
        summary,
    })
}
