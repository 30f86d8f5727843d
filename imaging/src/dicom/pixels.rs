//! Stored pixel values as numbers: native little-endian samples, RLE Lossless and JPEG-LS
//! decoded here, the other compressed syntaxes by dicom-pixeldata after their frame is held to
//! the header.

use std::path::Path;

use dicom_dictionary_std::{tags, uids};
use dicom_object::DefaultDicomObject;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};

use super::coded::{Frame, check_coded_frame};
use super::uint;
use crate::ReadError;

/// JPEG-LS lossless and near-lossless, decoded by `jpegls` rather than CharLS (C++).
const JPEG_LS: [&str; 2] = ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"];

/// The stored values of a slice's one frame, `expected` of them, whatever its transfer syntax.
/// Native pixels are read here: minimal headers (no High Bit, say) are common in exports and
/// need only Bits Allocated and Pixel Representation.
pub(super) fn stored_values(
    obj: &DefaultDicomObject,
    path: &Path,
    signed: bool,
    expected: usize,
) -> Result<Vec<f64>, ReadError> {
    let syntax = obj.meta().transfer_syntax().trim_end_matches('\0');
    let layout = || -> Result<(usize, usize), ReadError> {
        let bits = uint(obj, tags::BITS_ALLOCATED, path, "Bits Allocated")?.unwrap_or(16);
        let bits_stored = uint(obj, tags::BITS_STORED, path, "Bits Stored")?.unwrap_or(bits);
        Ok((bits, bits_stored))
    };
    let one_sample = |samples: Option<usize>| {
        if samples.is_some_and(|n| n != 1) {
            Err(ReadError::new(
                path,
                "colour image: a CT slice has one sample per pixel",
            ))
        } else {
            Ok(())
        }
    };
    let ours = |e: String| ReadError::new(path, e);
    match obj.get(tags::PIXEL_DATA).map(|e| e.value()) {
        None => Err(ReadError::new(path, "no Pixel Data")),
        Some(dicom_core::DicomValue::Primitive(value)) => {
            let (bits, bits_stored) = layout()?;
            native_samples(&value.to_bytes(), bits, bits_stored, signed, expected).map_err(ours)
        }
        Some(dicom_core::DicomValue::PixelSequence(sequence))
            if syntax == uids::RLE_LOSSLESS || JPEG_LS.contains(&syntax) =>
        {
            one_sample(uint(
                obj,
                tags::SAMPLES_PER_PIXEL,
                path,
                "Samples per Pixel",
            )?)?;
            let (bits, bits_stored) = layout()?;
            if syntax == uids::RLE_LOSSLESS {
                rle_samples(sequence.fragments(), bits, bits_stored, signed, expected)
            } else {
                let rows = uint(obj, tags::ROWS, path, "Rows")?.unwrap_or(0);
                let columns = uint(obj, tags::COLUMNS, path, "Columns")?.unwrap_or(0);
                jpegls_samples(
                    sequence.fragments(),
                    rows,
                    columns,
                    bits_stored,
                    signed,
                    expected,
                )
            }
            .map_err(ours)
        }
        Some(value) => {
            if let dicom_core::DicomValue::PixelSequence(sequence) = value {
                let frame = Frame {
                    rows: uint(obj, tags::ROWS, path, "Rows")?.unwrap_or(0),
                    columns: uint(obj, tags::COLUMNS, path, "Columns")?.unwrap_or(0),
                    bits_allocated: uint(obj, tags::BITS_ALLOCATED, path, "Bits Allocated")?
                        .unwrap_or(0),
                };
                let data: Vec<u8> = sequence.fragments().concat();
                check_coded_frame(syntax, &data, frame).map_err(ours)?;
            }
            let decoded = obj.decode_pixel_data().map_err(|e| {
                ReadError::new(
                    path,
                    format!("cannot decode pixel data (transfer syntax {syntax}): {e}"),
                )
            })?;
            one_sample(Some(decoded.samples_per_pixel() as usize))?;
            let options = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
            decoded
                .to_vec_with_options(&options)
                .map_err(|e| ReadError::new(path, format!("cannot convert pixel data: {e}")))
        }
    }
}

/// RLE Lossless (DICOM PS3.5 annex G), decoded here rather than by dicom-pixeldata, whose
/// decoder indexes past the end of a short or damaged segment: one fragment holding a 64-byte
/// header (the number of segments, then where each starts) and one PackBits segment per byte of
/// the sample, most significant first.
fn rle_samples(
    fragments: &[Vec<u8>],
    bits: usize,
    bits_stored: usize,
    signed: bool,
    expected: usize,
) -> Result<Vec<f64>, String> {
    let [fragment] = fragments else {
        return Err(format!(
            "{} fragments of RLE pixel data; a single-frame image has one",
            fragments.len()
        ));
    };
    if !matches!(bits, 8 | 16) {
        return Err(format!(
            "{bits} bits allocated in RLE pixel data; CT is stored in 8 or 16"
        ));
    }
    if fragment.len() < RLE_HEADER {
        return Err(format!(
            "the RLE fragment holds {} bytes, less than its {RLE_HEADER}-byte header",
            fragment.len()
        ));
    }
    let word = |at: usize| {
        u32::from_le_bytes(fragment[at..at + 4].try_into().expect("four bytes")) as usize
    };
    let width = bits / 8;
    let segments = word(0);
    if segments != width {
        return Err(format!(
            "{segments} RLE segments where one {bits}-bit sample per pixel has {width}"
        ));
    }
    let mut planes = Vec::with_capacity(width);
    for s in 0..width {
        let start = word(4 + 4 * s);
        let end = if s + 1 < width {
            word(8 + 4 * s)
        } else {
            fragment.len()
        };
        let segment = fragment
            .get(start..end)
            .filter(|_| start >= RLE_HEADER)
            .ok_or_else(|| {
                format!(
                    "RLE segment {} at bytes {start}..{end} is not inside its {}-byte fragment",
                    s + 1,
                    fragment.len()
                )
            })?;
        planes.push(unpack_bits(segment, expected).ok_or_else(|| {
            format!(
                "RLE segment {} ends before the {expected} bytes of the slice",
                s + 1
            )
        })?);
    }
    // Back to little-endian samples, for the one reading of stored values.
    let mut bytes = Vec::with_capacity(expected * width);
    for k in 0..expected {
        bytes.extend(planes.iter().rev().map(|plane| plane[k]));
    }
    native_samples(&bytes, bits, bits_stored, signed, expected)
}

/// JPEG-LS lossless and near-lossless (PS3.5 A.4.3 and A.4.4), decoded by [`super::jpegls`]:
/// the fragments of the one frame, joined, are one codestream. The codestream's size must be the
/// header's, and its samples are read as stored values like native ones (two's complement in
/// `bits_stored` bits when `signed`), so a signed scanner's -1024 comes out as -1024.
fn jpegls_samples(
    fragments: &[Vec<u8>],
    rows: usize,
    columns: usize,
    bits_stored: usize,
    signed: bool,
    expected: usize,
) -> Result<Vec<f64>, String> {
    let image = super::jpegls::decode(&fragments.concat())?;
    if image.width != columns || image.height != rows {
        return Err(format!(
            "the JPEG-LS frame is {}x{}, the header says {columns}x{rows}",
            image.width, image.height
        ));
    }
    if bits_stored == 0 || bits_stored > 16 {
        return Err(format!(
            "{bits_stored} bits stored in JPEG-LS pixel data, which holds 2 to 16"
        ));
    }
    let mut bytes = Vec::with_capacity(image.samples.len() * 2);
    for sample in &image.samples {
        bytes.extend_from_slice(&sample.to_le_bytes());
    }
    native_samples(&bytes, 16, bits_stored, signed, expected)
}

/// Where an RLE fragment's segments may start.
const RLE_HEADER: usize = 64;

/// The first `wanted` bytes a PackBits segment unpacks to: a header byte n, then n + 1 bytes as
/// they are (n from 0 to 127) or one byte repeated 1 - n times (n from -127 to -1; -128 is
/// nothing). None where the segment ends first.
fn unpack_bits(segment: &[u8], wanted: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while out.len() < wanted {
        let n = *segment.get(at)? as i8;
        at += 1;
        match n {
            0.. => {
                let literal = segment.get(at..at + n as usize + 1)?;
                out.extend_from_slice(literal);
                at += literal.len();
            }
            -127..=-1 => {
                let byte = *segment.get(at)?;
                at += 1;
                out.resize(out.len() + (1 - isize::from(n)) as usize, byte);
            }
            -128 => {}
        }
    }
    out.truncate(wanted);
    Some(out)
}

/// Little-endian native samples as numbers: `bits` allocated per sample, the low `bits_stored`
/// of them meaningful (two's complement when `signed`).
pub(super) fn native_samples(
    bytes: &[u8],
    bits: usize,
    bits_stored: usize,
    signed: bool,
    expected: usize,
) -> Result<Vec<f64>, String> {
    if !matches!(bits, 8 | 16 | 32) || bits_stored == 0 || bits_stored > bits {
        return Err(format!(
            "{bits} bits allocated with {bits_stored} stored is not a CT pixel layout"
        ));
    }
    let width = bits / 8;
    let needed = expected
        .checked_mul(width)
        .filter(|&n| n <= bytes.len())
        .ok_or_else(|| {
            format!(
                "pixel data holds {} bytes, {expected} pixels of {bits} bits need {}",
                bytes.len(),
                expected as u128 * width as u128
            )
        })?;
    let mask = if bits_stored == 32 {
        u32::MAX
    } else {
        (1u32 << bits_stored) - 1
    };
    let sign_bit = 1u32 << (bits_stored - 1);
    Ok(bytes[..needed]
        .chunks_exact(width)
        .map(|b| {
            let raw = b
                .iter()
                .rev()
                .fold(0u32, |acc, &byte| (acc << 8) | byte as u32)
                & mask;
            if signed && raw & sign_bit != 0 {
                raw as f64 - (mask as f64 + 1.0)
            } else {
                raw as f64
            }
        })
        .collect())
}
