//! PNG slice sets (`images/NAME.png` with `masks/NAME.png`, as in the MedSeg and Zenodo sets):
//! 8-bit grey planes with no geometry.

use std::path::Path;

use crate::ReadError;
use crate::volume::{Geometry, Volume};

/// Reads a PNG as 8-bit grey (the first channel of colour images).
pub fn read_gray_png(path: &Path) -> Result<(usize, usize, Vec<u8>), ReadError> {
    let png_err = |message: String| ReadError::new(path, format!("not a readable PNG: {message}"));
    let file = std::fs::File::open(path).map_err(|e| ReadError::new(path, e.to_string()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| png_err(e.to_string()))?;
    let mut buffer = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buffer)
        .map_err(|e| png_err(e.to_string()))?;
    let channels = info.color_type.samples();
    let (width, height) = (info.width as usize, info.height as usize);
    let gray = buffer[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|px| px[0])
        .collect::<Vec<u8>>();
    if gray.len() != width * height {
        return Err(png_err("unexpected pixel layout".into()));
    }
    Ok((width, height, gray))
}

/// A grey PNG as a one-plane volume (images as intensities, label files as values).
pub fn read_png_plane<T: From<u8> + Copy>(path: &Path) -> Result<Volume<T>, ReadError> {
    let (width, height, values) = read_gray_png(path)?;
    Volume::new(
        plane_geometry(width, height),
        values.into_iter().map(T::from).collect(),
    )
    .map_err(|e| ReadError::new(path, e.to_string()))
}

/// A PNG slice has no geometry: one plane, 1 mm pixels, at the origin.
pub fn plane_geometry(width: usize, height: usize) -> Geometry {
    Geometry {
        size: [width, height, 1],
        spacing: [1.0, 1.0, 1.0],
        origin: [0.0; 3],
        direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    }
}
