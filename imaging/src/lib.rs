//! CT itself, for everything that runs at a site: readers for DICOM series, DICOM SEG, NIfTI and
//! PNG slice sets into one canonical [`Volume`], the site's dataset description and its
//! validation, the preprocessing that turns volumes into what a model sees, synthetic CT, and
//! what a model's output becomes for a clinician (label volumes, lung masks, quantification).
//!
//! Errors name local files and are shown to the site only; nothing here is sent anywhere.

pub mod add_case;
pub mod dataset;
pub mod dicom;
pub mod dicom_write;
pub mod evaluate;
pub mod fuzzing;
pub mod lung;
pub mod nifti;
pub mod outputs;
pub mod png_slices;
pub mod preprocess;
pub mod preview;
pub mod quantify;
pub mod scan;
pub mod seg;
pub mod seg_write;
pub mod segment;
pub mod slices;
pub mod synth;
pub mod validate;
pub mod volume;

use std::path::{Path, PathBuf};

pub use slices::{Slice, SliceDataset};
pub use volume::{Geometry, Volume};

/// A file (or folder) that could not be read as what it was meant to be.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    pub message: String,
}

impl ReadError {
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
