//! Entry points for the fuzzers (`fuzz/`) and for replaying their corpus in the stable tests
//! (`imaging/tests/fuzz_corpus.rs`): each takes arbitrary bytes, as a site's files could hold
//! them, and must return, whatever they are; a panic is a bug. The readers take paths, so the
//! bytes are written into a fresh temporary folder first: what is fuzzed is the reader a site
//! runs, file system included.

use std::path::Path;
use std::sync::OnceLock;

use crate::dataset::{DESCRIPTION_FILE, DatasetSpec};
use crate::dicom_write::{SeriesTags, write_series};
use crate::volume::Geometry;
use crate::{dicom, nifti, seg, synth};

/// Most files one `dicom_series` input becomes: enough for ordering, spacing and mixed series,
/// few enough to keep executions fast.
const MAX_SERIES_FILES: usize = 8;

/// The synthetic series whose grid `seg` paints onto (`fuzz/seeds.py` draws its SEGs on it):
/// 16x16 pixels of 20 mm, 4 slices 5 mm apart.
const SEG_SERIES_SEED: u64 = 1;
const SEG_SERIES_SIZE: [usize; 3] = [16, 16, 4];
const SEG_SERIES_SPACING: [f64; 3] = [20.0, 20.0, 5.0];

/// A DICOM series: the input is split into files, each a 4-byte little-endian length and then
/// that many bytes (the last file takes whatever is left when the length runs past the end),
/// written as `00.dcm`, `01.dcm`, ... into one folder and read with [`dicom::read_series`].
/// Returns whether a volume was read.
pub fn dicom_series(data: &[u8]) -> bool {
    let folder = scratch();
    for (index, file) in series_files(data).into_iter().enumerate() {
        write(&folder.path().join(format!("{index:02}.dcm")), file);
    }
    let Ok(ct) = dicom::read_series(folder.path()) else {
        return false;
    };
    let grid = &ct.stack.grid;
    assert_eq!(ct.volume.voxels.len(), grid.voxel_count());
    assert_eq!(ct.stack.instances.len(), grid.size[2]);
    true
}

/// The files of a `dicom_series` input, in order.
fn series_files(data: &[u8]) -> Vec<&[u8]> {
    let mut files = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 && files.len() < MAX_SERIES_FILES {
        let (length, tail) = rest.split_at(4);
        let length = u32::from_le_bytes(length.try_into().expect("four bytes")) as usize;
        let (file, tail) = tail.split_at(length.min(tail.len()));
        files.push(file);
        rest = tail;
    }
    files
}

/// A DICOM SEG read with [`seg::read_seg`] onto the canonical grid of a small synthetic series
/// (`SEG_SERIES_SEED`, `SEG_SERIES_SIZE`, `SEG_SERIES_SPACING`). Returns whether a label volume was read.
pub fn seg(data: &[u8]) -> bool {
    let (grid, series_uid) = seg_series();
    let folder = scratch();
    let path = folder.path().join("seg.dcm");
    write(&path, data);
    let Ok(labels) = seg::read_seg(&path, grid, series_uid) else {
        return false;
    };
    assert_eq!(&labels.geometry, grid);
    assert_eq!(labels.voxels.len(), grid.voxel_count());
    true
}

/// The grid and Series Instance UID of the series [`seg`] reads onto: written as DICOM and read
/// back once, so that they are exactly what a site's reader makes of such a series.
fn seg_series() -> &'static (Geometry, String) {
    static SERIES: OnceLock<(Geometry, String)> = OnceLock::new();
    SERIES.get_or_init(|| {
        let case = synth::chest_ct(SEG_SERIES_SEED, SEG_SERIES_SIZE, SEG_SERIES_SPACING);
        let folder = scratch();
        write_series(
            folder.path(),
            &case.image,
            &SeriesTags::synthetic(SEG_SERIES_SEED),
            "slice",
        )
        .expect("a synthetic series can be written");
        let ct = dicom::read_series(folder.path()).expect("a synthetic series reads back");
        (ct.volume.geometry, ct.series_uid)
    })
}

/// A NIfTI-1 file, read both as an image and as labels; named `.nii.gz` when it starts with
/// gzip's magic, as such files are. Returns whether it was read as an image.
pub fn nifti(data: &[u8]) -> bool {
    let folder = scratch();
    let name = if data.starts_with(&[0x1f, 0x8b]) {
        "image.nii.gz"
    } else {
        "image.nii"
    };
    let path = folder.path().join(name);
    write(&path, data);
    let image = nifti::read_image_and_grid(&path);
    if let Ok((volume, grid)) = &image {
        assert_eq!(volume.voxels.len(), grid.voxel_count());
        assert_eq!(volume.geometry.voxel_count(), grid.voxel_count());
    }
    if let Ok(labels) = nifti::read_labels(&path) {
        assert_eq!(labels.voxels.len(), labels.geometry.voxel_count());
    }
    image.is_ok()
}

/// A `dataset.toml`, opened as a site's `--data` is: parsed and checked, without reading any
/// of the images it names. Returns whether it described a dataset.
pub fn dataset_toml(data: &[u8]) -> bool {
    let folder = scratch();
    let path = folder.path().join(DESCRIPTION_FILE);
    write(&path, data);
    let Ok(spec) = DatasetSpec::open(&path) else {
        return false;
    };
    assert!(!spec.cases.is_empty(), "a dataset without cases was opened");
    true
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary folder can be made")
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
