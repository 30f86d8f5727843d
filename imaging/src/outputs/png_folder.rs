//! `segment` on a PNG slice folder: a label PNG per slice in `masks/`, a report of pixel
//! counts (PNG slices have no physical size), and a preview of the slices with the most lesion.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use alveolus_models::Inference;
use serde::Serialize;

use super::{LABEL_MEANINGS, ModelInfo, OutputError, write_err, write_json, write_preview};
use crate::dataset::DatasetSpec;
use crate::preprocess::{Intensity, Window, windowed};
use crate::preview::{Tile, lesion_percent};
use crate::quantify::quantify;
use crate::scan::{Scan, read_scan};
use crate::segment::{SegmentOptions, Segmentation, segment};
use crate::volume::Volume;

/// A one-plane label volume as an 8-bit grey PNG of label values (as PNG slice sets store
/// masks), the model named in a text chunk.
pub(super) fn write_png_labels(
    path: &Path,
    labels: &Volume<u8>,
    info: &ModelInfo,
) -> io::Result<()> {
    let [width, height, _] = labels.geometry.size;
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .add_text_chunk("Software".into(), info.stamp())
        .map_err(io::Error::other)?;
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer
        .write_image_data(labels.plane(0))
        .map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

/// A slice of a PNG folder, as its report lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SliceReport {
    pub name: String,
    pub width: usize,
    pub height: usize,
    pub ggo_pixels: usize,
    pub consolidation_pixels: usize,
    /// Lesion pixels over lung pixels, where the model predicts the lung.
    pub involvement_percent: Option<f64>,
    pub lesion_percent_of_slice: f64,
}

/// `report.json` of a PNG slice folder: no physical sizes, so pixel counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct PngFolderReport {
    alveolus_version: &'static str,
    model: ModelInfo,
    input_format: &'static str,
    slices: Vec<SliceReport>,
    labels: BTreeMap<u8, &'static str>,
    files: Vec<String>,
}

/// Every slice of a PNG folder, masks into `dir/masks/NAME.png` (the layout of a PNG slice
/// set, so that `dir` with the images is a dataset again).
pub(super) fn segment_png_folder(
    model: &Inference,
    info: &ModelInfo,
    spec: &DatasetSpec,
    dir: &Path,
    options: &SegmentOptions,
    progress: &mut impl FnMut(&str, usize, usize),
) -> Result<Vec<SliceReport>, OutputError> {
    let masks = dir.join("masks");
    std::fs::create_dir_all(&masks).map_err(write_err(&masks))?;
    let mut slices = Vec::new();
    let mut kept: Vec<(String, Scan, Segmentation, f64)> = Vec::new();
    let total = spec.cases.len();
    for (k, case) in spec.cases.iter().enumerate() {
        let scan = read_scan(&case.image)?;
        let segmentation = segment(model, &scan.image, scan.intensity, options, &mut |_, _| {})?;
        let name = case
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("{}.png", case.id));
        let path = masks.join(&name);
        write_png_labels(&path, &segmentation.labels, info).map_err(write_err(&path))?;
        let q = quantify(&segmentation);
        let count = |label| {
            segmentation
                .labels
                .voxels
                .iter()
                .filter(|&&l| l == label)
                .count()
        };
        let percent = lesion_percent(&segmentation.labels.voxels);
        let [width, height, _] = scan.image.geometry.size;
        slices.push(SliceReport {
            name: name.clone(),
            width,
            height,
            ggo_pixels: count(crate::segment::GROUND_GLASS),
            consolidation_pixels: count(crate::segment::CONSOLIDATION),
            involvement_percent: q.total.involvement_percent,
            lesion_percent_of_slice: percent,
        });
        // Only the slices the preview may show are kept in memory.
        kept.push((name, scan, segmentation, percent));
        kept.sort_by(|a, b| b.3.total_cmp(&a.3));
        kept.truncate(6);
        progress(&case.id, k + 1, total);
    }
    let tiles: Vec<Tile> = kept
        .iter()
        .map(|(name, scan, segmentation, percent)| {
            let [width, height, _] = scan.image.geometry.size;
            Tile {
                grey: windowed(scan.image.plane(0), Intensity::Windowed8Bit, &Window::LUNG),
                labels: segmentation.labels.plane(0),
                lungs: segmentation.lungs.as_ref().map(|l| l.plane(0)),
                width,
                height,
                aspect: height as f64 / width as f64,
                caption: format!("{name}  lesion {percent:.1}%"),
            }
        })
        .collect();
    write_preview(dir, &tiles, info, false)?;
    write_json(
        &dir.join("report.json"),
        &PngFolderReport {
            alveolus_version: env!("CARGO_PKG_VERSION"),
            model: info.clone(),
            input_format: "PNG",
            slices: slices.clone(),
            labels: BTreeMap::from(LABEL_MEANINGS),
            files: vec!["masks/".into(), "preview.png".into(), "report.json".into()],
        },
    )?;
    Ok(slices)
}
