//! `preview.png`, what a clinician looks at first: the axial planes with the most lesion, in the
//! lung window, with the lesions coloured in, the lungs outlined and a legend.
//!
//! Planes are shown as radiologists read them (canonical orientation): anterior at the top and
//! the patient's right on the left of the image.

use std::io;
use std::path::Path;

use font8x8::legacy::BASIC_LEGACY;

use crate::preprocess::{Intensity, Window, windowed};
use crate::segment::{BACKGROUND, CONSOLIDATION, GROUND_GLASS, Segmentation};
use crate::volume::Volume;

/// Planes in the montage, and how many to a row.
const TILES: usize = 6;
const COLUMNS: usize = 3;
/// Width of each tile in pixels; heights follow the plane's physical aspect.
const TILE_WIDTH: usize = 256;
const LEGEND_HEIGHT: usize = 44;
/// Room for the legend's three entries however few tiles there are.
const MIN_WIDTH: usize = 600;

const GGO_COLOUR: [u8; 3] = [255, 214, 0];
const CONSOLIDATION_COLOUR: [u8; 3] = [235, 40, 40];
const LUNG_COLOUR: [u8; 3] = [0, 190, 255];
const TEXT_COLOUR: [u8; 3] = [255, 255, 255];

/// What the preview says besides the images.
pub struct PreviewText<'a> {
    /// Shown under the legend: the model version and round.
    pub model: &'a str,
    /// Whether the planes are in patient orientation (R and L markers are drawn); PNG slices
    /// come in whatever orientation they were exported in.
    pub oriented: bool,
}

/// The planes with the most lesion (or, where there is none, with the most lung; or else spread
/// over the scan), in order from head to feet.
pub fn chosen_planes(segmentation: &Segmentation) -> Vec<usize> {
    let labels = &segmentation.labels;
    let planes = labels.geometry.size[2];
    let count = |z: usize, lesion_only: bool| {
        labels
            .plane(z)
            .iter()
            .filter(|&&l| {
                if lesion_only {
                    matches!(l, GROUND_GLASS | CONSOLIDATION)
                } else {
                    l != BACKGROUND
                }
            })
            .count()
    };
    let mut ranked: Vec<(usize, usize)> = (0..planes).map(|z| (count(z, true), z)).collect();
    if ranked.iter().all(|&(n, _)| n == 0) {
        ranked = (0..planes).map(|z| (count(z, false), z)).collect();
    }
    let mut chosen: Vec<usize> = if ranked.iter().all(|&(n, _)| n == 0) {
        let k = TILES.min(planes);
        (0..k).map(|i| (2 * i + 1) * planes / (2 * k)).collect()
    } else {
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        ranked
            .into_iter()
            .take_while(|&(n, _)| n > 0)
            .take(TILES)
            .map(|(_, z)| z)
            .collect()
    };
    // Canonical z runs feet to head: the highest plane comes first.
    chosen.sort_by(|a, b| b.cmp(a));
    chosen.dedup();
    chosen
}

/// One plane of the montage.
pub struct Tile<'a> {
    /// 8-bit grey, row-major, `width` x `height`.
    pub grey: Vec<u8>,
    pub labels: &'a [u8],
    /// Lung sides (non-zero inside a lung), outlined; `None`: no lung mask, no outline.
    pub lungs: Option<&'a [u8]>,
    pub width: usize,
    pub height: usize,
    /// Height over width of the plane in mm (1 for PNG slices).
    pub aspect: f64,
    pub caption: String,
}

/// The tiles of a volume's chosen planes (see [`chosen_planes`]).
pub fn volume_tiles<'a>(
    image: &Volume<f32>,
    intensity: Intensity,
    window: &Window,
    segmentation: &'a Segmentation,
) -> Vec<Tile<'a>> {
    let [width, height, planes] = image.geometry.size;
    let [sx, sy, _] = image.geometry.spacing;
    chosen_planes(segmentation)
        .into_iter()
        .map(|z| {
            let labels = segmentation.labels.plane(z);
            Tile {
                grey: windowed(image.plane(z), intensity, window),
                labels,
                lungs: segmentation.lungs.as_ref().map(|l| l.plane(z)),
                width,
                height,
                aspect: (height as f64 * sy) / (width as f64 * sx),
                caption: format!(
                    "plane {} of {planes}  lesion {:.1}%",
                    z + 1,
                    lesion_percent(labels)
                ),
            }
        })
        .collect()
}

/// Percentage of a plane's pixels that are lesion.
pub fn lesion_percent(labels: &[u8]) -> f64 {
    let lesion = labels
        .iter()
        .filter(|&&l| matches!(l, GROUND_GLASS | CONSOLIDATION))
        .count();
    100.0 * lesion as f64 / labels.len().max(1) as f64
}

/// Writes `tiles` as a montage, three to a row, with the legend and `text` below.
pub fn write_montage(path: &Path, tiles: &[Tile], text: &PreviewText) -> io::Result<()> {
    let tile_height =
        |t: &Tile| ((TILE_WIDTH as f64 * t.aspect).round() as usize).clamp(64, 4 * TILE_WIDTH);
    let columns = COLUMNS.min(tiles.len()).max(1);
    let rows: Vec<usize> = tiles
        .chunks(columns)
        .map(|row| row.iter().map(tile_height).max().unwrap_or(TILE_WIDTH))
        .collect();
    let montage_height: usize = rows.iter().sum::<usize>().max(TILE_WIDTH);
    let mut canvas = Canvas::new(
        (columns * TILE_WIDTH).max(MIN_WIDTH),
        montage_height + LEGEND_HEIGHT,
    );
    let mut top = 0;
    for (row, row_height) in tiles.chunks(columns).zip(&rows) {
        for (k, tile) in row.iter().enumerate() {
            draw_tile(
                &mut canvas,
                tile,
                k * TILE_WIDTH,
                top,
                tile_height(tile),
                text.oriented,
            );
        }
        top += row_height;
    }
    let legend_top = montage_height + 6;
    let mut x = 6;
    let mut legend = vec![
        (GGO_COLOUR, "ground-glass opacity"),
        (CONSOLIDATION_COLOUR, "consolidation"),
    ];
    if tiles.iter().any(|t| t.lungs.is_some()) {
        legend.push((LUNG_COLOUR, "lung outline"));
    }
    for (colour, name) in legend {
        canvas.fill(x, legend_top, 12, 8, colour);
        canvas.text(x + 16, legend_top, name, TEXT_COLOUR);
        x += 16 + 8 * name.len() + 16;
    }
    canvas.text(6, legend_top + 18, text.model, TEXT_COLOUR);
    canvas.write_png(path)
}

fn draw_tile(
    canvas: &mut Canvas,
    tile: &Tile,
    left: usize,
    top: usize,
    tile_height: usize,
    oriented: bool,
) {
    let (width, height) = (tile.width, tile.height);
    let source = |tx: usize, ty: usize| {
        let x = (tx * width / TILE_WIDTH).min(width - 1);
        let y = (ty * height / tile_height).min(height - 1);
        y * width + x
    };
    // Without a lung mask there is no outline to draw.
    let in_lung = |i: usize| tile.lungs.is_some_and(|l| l[i] != 0);
    for ty in 0..tile_height {
        for tx in 0..TILE_WIDTH {
            let i = source(tx, ty);
            let g = tile.grey[i];
            let mut rgb = [g, g, g];
            match tile.labels[i] {
                GROUND_GLASS => rgb = blend(rgb, GGO_COLOUR, 0.45),
                CONSOLIDATION => rgb = blend(rgb, CONSOLIDATION_COLOUR, 0.55),
                _ => {}
            }
            let edge = in_lung(i)
                && [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|&(dx, dy)| {
                    let (nx, ny) = (tx as isize + dx, ty as isize + dy);
                    nx >= 0
                        && ny >= 0
                        && (nx as usize) < TILE_WIDTH
                        && (ny as usize) < tile_height
                        && !in_lung(source(nx as usize, ny as usize))
                });
            if edge {
                rgb = LUNG_COLOUR;
            }
            canvas.set(left + tx, top + ty, rgb);
        }
    }
    canvas.text(left + 4, top + 4, &tile.caption, TEXT_COLOUR);
    if oriented {
        canvas.text(left + 4, top + tile_height / 2, "R", TEXT_COLOUR);
        canvas.text(
            left + TILE_WIDTH - 12,
            top + tile_height / 2,
            "L",
            TEXT_COLOUR,
        );
    }
}

fn blend(under: [u8; 3], over: [u8; 3], alpha: f32) -> [u8; 3] {
    std::array::from_fn(|c| {
        (under[c] as f32 * (1.0 - alpha) + over[c] as f32 * alpha).round() as u8
    })
}

/// An RGB image being drawn.
struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            rgb: vec![0; width * height * 3],
        }
    }

    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = 3 * (y * self.width + x);
            self.rgb[i..i + 3].copy_from_slice(&rgb);
        }
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, rgb: [u8; 3]) {
        for dy in 0..h {
            for dx in 0..w {
                self.set(x + dx, y + dy, rgb);
            }
        }
    }

    /// ASCII text in an 8x8 font on a dark band, so that it reads on any image.
    fn text(&mut self, x: usize, y: usize, text: &str, rgb: [u8; 3]) {
        for (k, ch) in text.chars().enumerate() {
            let glyph = BASIC_LEGACY[(ch as usize).min(127)];
            let left = x + 8 * k;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    let on = bits >> col & 1 == 1;
                    let (px, py) = (left + col, y + row);
                    if on {
                        self.set(px, py, rgb);
                    } else if px < self.width && py < self.height {
                        let i = 3 * (py * self.width + px);
                        for c in &mut self.rgb[i..i + 3] {
                            *c /= 3;
                        }
                    }
                }
            }
        }
    }

    fn write_png(&self, path: &Path) -> io::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut encoder = png::Encoder::new(
            io::BufWriter::new(file),
            self.width as u32,
            self.height as u32,
        );
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // CT noise compresses poorly; the best filter per row and the strongest deflate halve
        // the file for a picture written once.
        encoder.set_compression(png::Compression::Best);
        encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
        let mut writer = encoder.write_header().map_err(io::Error::other)?;
        writer
            .write_image_data(&self.rgb)
            .map_err(io::Error::other)?;
        writer.finish().map_err(io::Error::other)
    }
}
