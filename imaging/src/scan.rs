//! A CT scan as read for use, whatever its format: the canonical image, what its voxels
//! measure, and where it came from, so that outputs can go back onto the file's own grid.

use std::path::Path;

use crate::ReadError;
use crate::dicom::{CtImage, SeriesStack, read_series};
use crate::nifti;
use crate::png_slices::read_png_plane;
use crate::preprocess::Intensity;
use crate::volume::{Geometry, Volume};

/// An image read from a DICOM series or file, a NIfTI file or a PNG slice.
#[derive(Debug, Clone)]
pub struct Scan {
    /// On the canonical grid.
    pub image: Volume<f32>,
    pub intensity: Intensity,
    /// DICOM Modality, where the image came from DICOM and says one.
    pub modality: Option<String>,
    pub source: Source,
}

/// Where a scan came from, with what an output needs to lie on it.
#[derive(Debug, Clone)]
pub enum Source {
    /// A DICOM series (or a single DICOM file).
    Dicom {
        series_uid: String,
        stack: SeriesStack,
    },
    /// A NIfTI file, and its own grid (its axis order).
    Nifti { grid: Geometry },
    /// A PNG slice: an already windowed plane without geometry.
    Png,
}

/// Reads `path`: a `.nii`/`.nii.gz` file, a `.png` slice, or else a DICOM series folder or
/// file.
pub fn read_scan(path: &Path) -> Result<Scan, ReadError> {
    if !path.exists() {
        return Err(ReadError::new(path, "no such file or folder"));
    }
    if is_nifti(path) {
        let (image, grid) = nifti::read_image_and_grid(path)?;
        return Ok(Scan {
            image,
            intensity: Intensity::Hounsfield { padding: None },
            modality: None,
            source: Source::Nifti { grid },
        });
    }
    if has_extension(path, "png") {
        return Ok(Scan {
            image: read_png_plane(path)?,
            intensity: Intensity::Windowed8Bit,
            modality: None,
            source: Source::Png,
        });
    }
    let CtImage {
        volume,
        padding_hu,
        modality,
        series_uid,
        stack,
    } = read_series(path)?;
    Ok(Scan {
        image: volume,
        intensity: Intensity::Hounsfield {
            padding: padding_hu,
        },
        modality,
        source: Source::Dicom { series_uid, stack },
    })
}

pub(crate) fn has_extension(path: &Path, extension: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(extension))
}

pub(crate) fn is_nifti(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// Part-10 files carry "DICM" after a 128-byte preamble, whatever their name.
pub(crate) fn is_dicom_file(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|_| &head[128..] == b"DICM")
}
