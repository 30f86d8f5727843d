//! A site's CT data: readers for DICOM series, DICOM SEG, NIfTI and PNG slice sets into one
//! canonical [`Volume`], the site's dataset description, its validation, and the preprocessing
//! that turns volumes into what the model trains on.
//!
//! Errors name local files and are shown to the site only; nothing here is sent anywhere.

pub mod dataset;
pub mod dicom;
pub mod dicom_write;
pub mod nifti;
pub mod preprocess;
pub mod seg;
pub mod synth;
pub mod validate;
pub mod volume;

use std::path::{Path, PathBuf};

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
