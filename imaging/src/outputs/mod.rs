//! `alveolus segment`'s files: for each scan a folder with the label volume on the scan's own
//! grid (`labels.nii.gz`, and `lungs.nii.gz` for the right/left split), a DICOM SEG of a DICOM
//! series (`seg.dcm`), `report.json` and `preview.png`; for a PNG slice folder, a PNG mask per
//! slice. Every file names the model version (the sha256 of the model file) and its round.
//!
//! A folder is written whole or not at all: everything goes into a hidden sibling folder first,
//! which takes the folder's name only when complete. An existing folder with results is refused
//! unless the caller forces it, and then replaced only by a complete new one (`folder`).

mod folder;
mod png_folder;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use alveolus_models::Inference;
use serde::Serialize;

use folder::{commit, folder_name, has_entries, refuse_results};
pub use png_folder::SliceReport;
use png_folder::{segment_png_folder, write_png_labels};

use crate::ReadError;
use crate::dataset::{DatasetError, DatasetSpec, SourceKind};
use crate::nifti;
use crate::preprocess::{Intensity, not_chest_ct_hu, value_range};
use crate::preview::{PreviewText, Tile, volume_tiles, write_montage};
use crate::quantify::{Quantities, quantify};
use crate::scan::{Scan, Source, read_scan};
use crate::seg_write::{Algorithm, write_seg};
use crate::segment::{SegmentError, SegmentOptions, Segmentation, segment};
use crate::volume::Geometry;

/// Which model made a segmentation: what every output says about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// sha256 of the model file, as the coordinator names versions.
    pub version: String,
    /// The federated round that made it, from the manifest beside the file (`model pull`
    /// writes it); `None` for a model without one (a local `train`).
    pub round: Option<u32>,
    pub run: Option<String>,
    pub classes: usize,
    pub image_size: usize,
}

/// The parts of a checkpoint manifest a site reads.
#[derive(serde::Deserialize)]
struct ManifestFields {
    sha256: String,
    round: u32,
    run_id: String,
}

impl ModelInfo {
    /// The version of the model file at `path` (whose bytes are `bytes`), with the round and
    /// run from `path` with the extension `.json` where that manifest is of this very file.
    pub fn of_file(path: &Path, bytes: &[u8], classes: usize, image_size: usize) -> Self {
        let version = alveolus_proto::sha256_hex(bytes);
        let manifest = std::fs::read(path.with_extension("json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<ManifestFields>(&b).ok())
            .filter(|m| m.sha256 == version);
        Self {
            version,
            round: manifest.as_ref().map(|m| m.round),
            run: manifest.map(|m| m.run_id),
            classes,
            image_size,
        }
    }

    /// What the label files carry as their description: the whole version and the round.
    pub fn stamp(&self) -> String {
        match self.round {
            Some(round) => format!("alveolus model {} round {round}", self.version),
            None => format!("alveolus model {}", self.version),
        }
    }

    /// `model 1a2b3c4d5e6f, round 12` (or `no federated round`).
    pub fn describe(&self) -> String {
        let short = &self.version[..12.min(self.version.len())];
        match self.round {
            Some(round) => format!("model {short}, round {round}"),
            None => format!("model {short}, no federated round (no manifest beside it)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "{}: already holds results; choose another folder or pass --force to replace them",
        .0.display()
    )]
    Exists(PathBuf),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0}")]
    Segment(#[from] SegmentError),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

pub(super) fn write_err(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |source| OutputError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// `report.json`: what was found and with what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub alveolus_version: &'static str,
    pub model: ModelInfo,
    /// `DICOM`, `NIfTI` or `PNG`.
    pub input_format: &'static str,
    /// Voxels along x, y, z of the canonical grid (x to the patient's left, y posterior, z up).
    pub shape: [usize; 3],
    #[serde(flatten)]
    pub quantities: Quantities,
    /// What the label values of the label files mean.
    pub labels: BTreeMap<u8, &'static str>,
    /// The files written beside this report.
    pub files: Vec<String>,
    /// Why no DICOM SEG was written for a DICOM input, if none was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seg_skipped: Option<String>,
}

pub const LABEL_MEANINGS: [(u8, &str); 4] = [
    (0, "background"),
    (1, "ground-glass opacity"),
    (2, "consolidation"),
    (3, "lung without lesion"),
];

/// What was written for one scan, or for a PNG slice folder.
#[derive(Debug, Clone, PartialEq)]
pub enum Summary {
    Scan(Box<Report>),
    Slices(Vec<SliceReport>),
}

/// What became of one scan (or one PNG slice folder) of the input.
#[derive(Debug)]
pub struct CaseOutcome {
    /// The case id for datasets; `None` for a single scan or a PNG slice folder.
    pub id: Option<String>,
    pub folder: PathBuf,
    pub result: Result<Summary, OutputError>,
}

/// Segments everything `input` holds (anything `data validate` reads: a DICOM series folder or
/// file, a NIfTI file, a PNG slice folder, or a dataset description, whose cases each get a
/// folder of their own named by id) into `out`. `progress` hears the case being worked on and
/// the planes done of how many.
pub fn segment_input(
    model: &Inference,
    info: &ModelInfo,
    input: &Path,
    out: &Path,
    options: &SegmentOptions,
    force: bool,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Vec<CaseOutcome>, OutputError> {
    let spec = DatasetSpec::open(input)?;
    refuse_results(out, force)?;
    match spec.kind {
        SourceKind::Single => {
            let result = commit(out, |staging| {
                segment_scan(
                    model,
                    info,
                    &spec.cases[0].image,
                    staging,
                    options,
                    &mut |d, t| progress("", d, t),
                )
            })
            .map(|r| Summary::Scan(Box::new(r)));
            Ok(vec![CaseOutcome {
                id: None,
                folder: out.to_path_buf(),
                result,
            }])
        }
        SourceKind::PngFolder => {
            let result = commit(out, |staging| {
                segment_png_folder(model, info, &spec, staging, options, &mut progress)
            })
            .map(Summary::Slices);
            Ok(vec![CaseOutcome {
                id: None,
                folder: out.to_path_buf(),
                result,
            }])
        }
        SourceKind::Description => {
            std::fs::create_dir_all(out).map_err(write_err(out))?;
            let options = SegmentOptions {
                window: spec.window,
                ..options.clone()
            };
            let mut outcomes = Vec::new();
            for case in &spec.cases {
                let folder = out.join(folder_name(&case.id));
                let result = if folder.exists() && !force && has_entries(&folder) {
                    Err(OutputError::Exists(folder.clone()))
                } else {
                    commit(&folder, |staging| {
                        segment_scan(model, info, &case.image, staging, &options, &mut |d, t| {
                            progress(&case.id, d, t)
                        })
                    })
                    .map(|r| Summary::Scan(Box::new(r)))
                };
                outcomes.push(CaseOutcome {
                    id: Some(case.id.clone()),
                    folder,
                    result,
                });
            }
            Ok(outcomes)
        }
    }
}

fn elapsed(started: Instant) -> String {
    format!("{:.1}", started.elapsed().as_secs_f64())
}

/// One scan into `dir`: labels, lungs, SEG (DICOM input), preview and report.
fn segment_scan(
    model: &Inference,
    info: &ModelInfo,
    path: &Path,
    dir: &Path,
    options: &SegmentOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, OutputError> {
    let started = Instant::now();
    let Scan {
        image,
        intensity,
        modality,
        source,
    } = read_scan(path)?;
    if let Some(modality) = modality.as_deref().filter(|m| *m != "CT") {
        return Err(OutputError::Read(ReadError::new(
            path,
            format!("modality is {modality}, not CT: the model segments CT"),
        )));
    }
    if let Intensity::Hounsfield { padding } = intensity
        && let Some(why) = not_chest_ct_hu(value_range(&image.voxels, padding))
    {
        return Err(OutputError::Read(ReadError::new(
            path,
            format!("{why}: not a CT scan?"),
        )));
    }
    let shape = image.geometry.size;
    tracing::info!(?shape, seconds = elapsed(started), "scan read");
    let started = Instant::now();
    let segmentation = segment(model, &image, intensity, options, progress)?;
    let quantities = quantify(&segmentation);
    tracing::info!(seconds = elapsed(started), "segmented");
    // The preview's planes are taken now, so that the scan itself can go before the files are
    // written: memory then holds the labels, not the scan.
    let tiles = volume_tiles(&image, intensity, &options.window, &segmentation);
    drop(image);
    let started = Instant::now();
    let mut files = Vec::new();
    let mut seg_skipped = None;
    let format = match &source {
        Source::Dicom { series_uid, stack } => {
            // The grid dcm2niix writes a series on: the stored grid with its rows reversed.
            let grid = rows_reversed(&stack.grid);
            write_label_files(dir, &segmentation, &grid, info, &mut files)?;
            let parameters = seg_parameters(info, &segmentation);
            let algorithm = Algorithm {
                model_version: &info.version,
                parameters: &parameters,
            };
            let seg_path = dir.join("seg.dcm");
            match write_seg(
                &seg_path,
                &segmentation.labels,
                stack,
                series_uid,
                &algorithm,
            ) {
                Ok(()) => files.push("seg.dcm".into()),
                Err(crate::seg_write::SegWriteError::MissingReference(what)) => {
                    seg_skipped = Some(format!(
                        "the series has no {what}, which a DICOM SEG must refer to"
                    ));
                }
                Err(crate::seg_write::SegWriteError::Io(e)) => {
                    return Err(write_err(&seg_path)(e));
                }
            }
            "DICOM"
        }
        Source::Nifti { grid } => {
            write_label_files(dir, &segmentation, grid, info, &mut files)?;
            "NIfTI"
        }
        Source::Png => {
            let labels_path = dir.join("labels.png");
            write_png_labels(&labels_path, &segmentation.labels, info)
                .map_err(write_err(&labels_path))?;
            files.push("labels.png".into());
            "PNG"
        }
    };
    write_preview(dir, &tiles, info, !matches!(source, Source::Png))?;
    files.push("preview.png".into());
    tracing::info!(seconds = elapsed(started), "outputs written");
    files.push("report.json".into());
    let report = Report {
        alveolus_version: env!("CARGO_PKG_VERSION"),
        model: info.clone(),
        input_format: format,
        shape,
        quantities,
        labels: BTreeMap::from(LABEL_MEANINGS),
        files,
        seg_skipped,
    };
    write_json(&dir.join("report.json"), &report)?;
    Ok(report)
}

/// `preview.png` in `dir`; `oriented`: the tiles are in patient orientation.
pub(super) fn write_preview(
    dir: &Path,
    tiles: &[Tile],
    info: &ModelInfo,
    oriented: bool,
) -> Result<(), OutputError> {
    let path = dir.join("preview.png");
    let text = PreviewText {
        model: &info.describe(),
        oriented,
    };
    write_montage(&path, tiles, &text).map_err(write_err(&path))
}

/// Free text for the SEG's Algorithm Parameters.
fn seg_parameters(info: &ModelInfo, segmentation: &Segmentation) -> String {
    format!(
        "model sha256 {}; round {}; run {}; classes {}; input {} px; lung mask {}",
        info.version,
        info.round.map_or("none".into(), |r| r.to_string()),
        info.run.as_deref().unwrap_or("none"),
        info.classes,
        info.image_size,
        match segmentation.lung_method {
            Some(crate::segment::LungMethod::Model) => "model",
            Some(crate::segment::LungMethod::Hu) => "hu",
            None => "none",
        }
    )
}

/// `grid` with its second axis reversed (same voxels, rows in the opposite order).
pub fn rows_reversed(grid: &Geometry) -> Geometry {
    let mut reversed = grid.clone();
    reversed.origin = grid.position([0.0, (grid.size[1] - 1) as f64, 0.0]);
    reversed.direction[1] = grid.direction[1].map(|c| -c);
    reversed
}

fn write_label_files(
    dir: &Path,
    segmentation: &Segmentation,
    grid: &Geometry,
    info: &ModelInfo,
    files: &mut Vec<String>,
) -> Result<(), OutputError> {
    let mut volumes = vec![("labels.nii.gz", &segmentation.labels)];
    if let Some(lungs) = &segmentation.lungs {
        volumes.push(("lungs.nii.gz", lungs));
    }
    for (name, volume) in volumes {
        let path = dir.join(name);
        let on_grid = volume
            .on_grid(grid)
            .map_err(|e| write_err(&path)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        nifti::write_described(&path, &on_grid, &info.stamp()).map_err(write_err(&path))?;
        files.push(name.into());
    }
    Ok(())
}

pub(super) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), OutputError> {
    let json =
        serde_json::to_vec_pretty(value).map_err(|e| write_err(path)(io::Error::other(e)))?;
    std::fs::write(path, json).map_err(write_err(path))
}
