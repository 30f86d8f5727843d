//! The site's training data as the agent holds it: loaded at start, and loaded again before a
//! round when its description has changed (a case added by `alveolus data add-case`, say), so
//! that a radiologist's correction reaches the next round without restarting the agent. A
//! description that no longer loads leaves the agent training on what it had.
//!
//! Beside the training cases the agent holds the dataset's `validation` cases, on which it
//! measures each round's global model when the run asks; they never train and never leave.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use alveolus_imaging::SliceDataset;
use alveolus_imaging::dataset::{
    CaseReport, DESCRIPTION_FILE, DatasetError, Loaded, Purpose, load,
};

/// When the files that describe a dataset were last changed.
type Stamp = Vec<(PathBuf, Option<SystemTime>)>;

pub struct SiteData {
    path: PathBuf,
    skip_bad_cases: bool,
    stamp: Stamp,
    slices: SliceDataset,
    /// The validation cases' slices and how many cases they are; None: the dataset has none
    /// (or they do not load, which was logged).
    validation: Option<(Arc<SliceDataset>, usize)>,
}

impl SiteData {
    /// Loads the training cases of the dataset at `path` (see `dataset::load`), and says
    /// what was skipped or looks odd, for the site's terminal.
    pub fn load(path: &Path, skip_bad_cases: bool) -> Result<(Self, Notes), DatasetError> {
        let stamp = stamp(path);
        let (slices, notes) = Notes::split(load(path, Purpose::Training, skip_bad_cases)?);
        let data = Self {
            path: path.to_path_buf(),
            skip_bad_cases,
            stamp,
            slices,
            validation: load_validation(path, skip_bad_cases),
        };
        Ok((data, notes))
    }

    pub fn slices(&self) -> &SliceDataset {
        &self.slices
    }

    /// The validation cases' slices and their case count, if the dataset has any.
    pub fn validation(&self) -> Option<&(Arc<SliceDataset>, usize)> {
        self.validation.as_ref()
    }

    /// Loads the dataset again if its description changed since it was last loaded. `None`:
    /// unchanged. `Some(Ok)`: reloaded (with what was skipped or looks odd). `Some(Err)`:
    /// changed but not loadable; the previous slices stay, and the same change is not tried
    /// again.
    pub fn refresh(&mut self) -> Option<Result<Notes, DatasetError>> {
        let now = stamp(&self.path);
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        Some(
            load(&self.path, Purpose::Training, self.skip_bad_cases).map(|loaded| {
                let (slices, notes) = Notes::split(loaded);
                self.slices = slices;
                self.validation = load_validation(&self.path, self.skip_bad_cases);
                notes
            }),
        )
    }
}

/// What a load left out or found odd.
#[derive(Debug, Default)]
pub struct Notes {
    /// Cases left out for errors (only when bad cases are skipped).
    pub skipped: Vec<CaseReport>,
    /// Used cases with warnings.
    pub warned: Vec<CaseReport>,
}

impl Notes {
    fn split(loaded: Loaded) -> (SliceDataset, Self) {
        let Loaded {
            slices,
            skipped,
            warned,
            ..
        } = loaded;
        (slices, Self { skipped, warned })
    }
}

/// The dataset's validation cases; a dataset without any has none to measure on, and one whose
/// validation cases do not load is reported and measures nothing.
pub fn load_validation(path: &Path, skip_bad_cases: bool) -> Option<(Arc<SliceDataset>, usize)> {
    match load(path, Purpose::Validation, skip_bad_cases) {
        Ok(loaded) => Some((Arc::new(loaded.slices), loaded.cases)),
        Err(DatasetError::Empty { .. }) => None,
        Err(e) => {
            tracing::warn!("the validation cases do not load; this site reports none: {e}");
            None
        }
    }
}

/// The modification times of what describes the dataset at `path`: its `dataset.toml`, or a
/// PNG folder's `images/` and `masks/` (adding a file changes a folder's time).
fn stamp(path: &Path) -> Stamp {
    let files: Vec<PathBuf> = if path.is_dir() {
        let description = path.join(DESCRIPTION_FILE);
        if description.is_file() {
            vec![description]
        } else {
            vec![path.join("images"), path.join("masks")]
        }
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let modified = std::fs::metadata(&f).and_then(|m| m.modified()).ok();
            (f, modified)
        })
        .collect()
}
