//! DICOM CT series: files grouped by Series Instance UID, slices ordered along the normal of
//! their Image Orientation by Image Position (never by file name or Instance Number), slice
//! spacing from those positions (Slice Thickness can differ from it), stored values rescaled to
//! HU. Compressed pixel data goes through dicom-pixeldata's pure-Rust codecs.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_core::header::{HasLength, Header, Length};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::decode::Decode;
use dicom_encoding::decode::explicit_le::ExplicitVRLittleEndianDecoder;
use dicom_encoding::{Codec, TransferSyntax, TransferSyntaxIndex};
use dicom_object::{DefaultDicomObject, FileMetaTable, InMemDicomObject, OpenFileOptions};
use dicom_parser::DataSetReader;
use dicom_parser::dataset::DataToken;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::ReadError;
use crate::volume::{Geometry, Volume, cross, dot};

/// Modalities whose objects hold no CT voxels; a series folder may hold them (a SEG beside its
/// series) and they are not part of the image.
const NON_IMAGE_MODALITIES: [&str; 7] = ["SEG", "SR", "RTSTRUCT", "PR", "KO", "REG", "RTPLAN"];

/// Relative disagreement between slice gaps above which a series is called uneven (a missing
/// or duplicated slice, or a scout mixed in).
const SPACING_TOLERANCE: f64 = 0.01;

/// A CT volume in Hounsfield units.
#[derive(Debug, Clone)]
pub struct CtImage {
    pub volume: Volume<f32>,
    /// HU value the scanner wrote outside its field of view (DICOM Pixel Padding Value); those
    /// voxels are not tissue and are treated as air by preprocessing.
    pub padding_hu: Option<f32>,
    /// Modality as written in the files (None where the tag is absent); validation warns about
    /// anything other than CT.
    pub modality: Option<String>,
    /// Series Instance UID, to check that a segmentation was drawn on this series.
    pub series_uid: String,
    /// The slices as stored, for outputs that refer back to them.
    pub stack: SeriesStack,
}

/// A series' slices as stored, for outputs that refer back to them (a DICOM SEG names each
/// source image and places each frame where its image is).
#[derive(Debug, Clone)]
pub struct SeriesStack {
    /// The stored grid: x along Image Orientation's row direction (across a slice's columns),
    /// y along its column direction, z through the slices in the order of their position along
    /// the normal. The canonical volume is this grid with axes permuted and reversed.
    pub grid: Geometry,
    /// The image in each plane of `grid`, in order.
    pub instances: Vec<Instance>,
    /// Frame of Reference UID of the series (of its first image where they differ).
    pub frame_of_reference_uid: Option<String>,
}

/// One stored image of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub path: PathBuf,
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    /// Image Position (Patient) as the file says it.
    pub position: Option<[f64; 3]>,
}

/// What one file says about its place in the series, read without its pixels.
#[derive(Debug, Clone)]
pub(crate) struct SliceHeader {
    pub path: PathBuf,
    pub series_uid: String,
    pub modality: Option<String>,
    pub rows: usize,
    pub columns: usize,
    /// Row direction then column direction (Image Orientation (Patient)).
    pub orientation: Option<[f64; 6]>,
    pub position: Option<[f64; 3]>,
    /// Spacing between rows, then between columns.
    pub pixel_spacing: Option<[f64; 2]>,
    pub slice_thickness: Option<f64>,
    pub frames: usize,
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    pub frame_of_reference_uid: Option<String>,
}

pub(crate) fn open_header(path: &Path) -> Result<DefaultDicomObject, ReadError> {
    check_value_lengths(path, true)?;
    OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| ReadError::new(path, format!("not a readable DICOM file: {e}")))
}

pub(crate) fn open_full_object(path: &Path) -> Result<DefaultDicomObject, ReadError> {
    check_value_lengths(path, false)?;
    dicom_object::open_file(path)
        .map_err(|e| ReadError::new(path, format!("not a readable DICOM file: {e}")))
}

/// Refuses a file in which a value is longer than what follows its header. dicom-object
/// allocates each value as long as its header says before reading it, so a few damaged bytes
/// (a length of 0xF8300002) would otherwise cost gigabytes. The file is parsed first as
/// dicom-object parses it (the same buffered reader, preamble, file meta group, then the data set
/// in its transfer syntax with the same parser) and each header is held against the bytes left
/// before its value is read; with `header_only`, only as far as [`open_header`] reads. Anything
/// else wrong is left to dicom-object, which names it.
fn check_value_lengths(path: &Path, header_only: bool) -> Result<(), ReadError> {
    let too_long = |tag: Tag, declared: u32, left: u64| {
        ReadError::new(
            path,
            format!(
                "not a readable DICOM file: {tag} declares a value of {declared} bytes, but only {left} bytes follow it"
            ),
        )
    };
    let Ok(file) = File::open(path) else {
        return Ok(());
    };
    let Ok(file_len) = file.metadata().map(|m| m.len()) else {
        return Ok(());
    };
    // Read exactly as dicom-object reads: a deflated data set then inflates in the same pieces,
    // and a damaged one fails at the same byte.
    let mut source = BufReader::new(file);
    let preamble = match source.fill_buf() {
        Ok(head) if head.len() >= 132 && head[128..132] == *b"DICM" => true,
        Ok(head) if head.len() >= 4 && head[..4] == *b"DICM" => false,
        _ => return Ok(()),
    };
    if preamble && source.read_exact(&mut [0u8; 128]).is_err() {
        return Ok(());
    }
    check_meta_lengths(path, if preamble { 128 } else { 0 }, file_len, too_long)?;
    let Ok(meta) = FileMetaTable::from_reader(&mut source) else {
        return Ok(());
    };
    let Ok(data_set_start) = source.stream_position() else {
        return Ok(());
    };
    let Some(syntax) = TransferSyntaxRegistry.get(meta.transfer_syntax()) else {
        return Ok(());
    };
    let file_left = file_len.saturating_sub(data_set_start);
    let read = Cell::new(0u64);
    match syntax.codec() {
        Codec::Dataset(Some(adapter)) => {
            // How far a damaged stream inflates depends on how it is read; a sound stream
            // inflates to at most MAX_DEFLATE_RATIO times its size.
            let stream = Counted {
                inner: adapter.adapt_reader(Box::new(source)),
                count: &read,
            };
            let left = || {
                file_left
                    .saturating_mul(MAX_DEFLATE_RATIO)
                    .saturating_sub(read.get())
            };
            check_data_set(stream, syntax, header_only, left, too_long)
        }
        Codec::Dataset(None) => Ok(()),
        Codec::None | Codec::EncapsulatedPixelData(..) => {
            let stream = Counted {
                inner: source,
                count: &read,
            };
            let left = || file_left.saturating_sub(read.get());
            check_data_set(stream, syntax, header_only, left, too_long)
        }
    }
}

/// Deflate's best case: a 258-byte match in two bits.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// The file meta group part of [`check_value_lengths`], read on a handle of its own: the group
/// (after the magic code at `start`) is explicit VR little endian and as long as its group length
/// says, as dicom-object reads it.
fn check_meta_lengths(
    path: &Path,
    start: u64,
    file_len: u64,
    too_long: impl Fn(Tag, u32, u64) -> ReadError,
) -> Result<(), ReadError> {
    let Ok(file) = File::open(path) else {
        return Ok(());
    };
    let offset = Cell::new(start);
    let mut source = Counted {
        inner: BufReader::new(file),
        count: &offset,
    };
    if source.inner.seek(SeekFrom::Start(start)).is_err()
        || source.read_exact(&mut [0u8; 4]).is_err()
    {
        return Ok(());
    }
    let file_left = || file_len.saturating_sub(offset.get());
    let decoder = ExplicitVRLittleEndianDecoder::default();
    match decoder.decode_header(&mut source) {
        Ok((header, _)) if header.tag() == Tag(0x0002, 0x0000) && header.length() == Length(4) => {}
        _ => return Ok(()),
    }
    let mut word = [0u8; 4];
    if source.read_exact(&mut word).is_err() {
        return Ok(());
    }
    let group_length = u32::from_le_bytes(word);
    let mut meta_read = 0u32;
    while meta_read < group_length {
        let Ok((header, header_bytes)) = decoder.decode_header(&mut source) else {
            return Ok(());
        };
        let Some(len) = header.length().get() else {
            return Ok(());
        };
        if u64::from(len) > file_left() {
            return Err(too_long(header.tag(), len, file_left()));
        }
        if io::copy(&mut (&mut source).take(u64::from(len)), &mut io::sink()).is_err() {
            return Ok(());
        }
        meta_read = meta_read
            .saturating_add(header_bytes as u32)
            .saturating_add(len);
    }
    Ok(())
}

/// The data set part of [`check_value_lengths`]: `left` says how many bytes the stream has left.
fn check_data_set(
    stream: impl Read,
    syntax: &TransferSyntax,
    header_only: bool,
    left: impl Fn() -> u64,
    too_long: impl Fn(Tag, u32, u64) -> ReadError,
) -> Result<(), ReadError> {
    let Ok(reader) = DataSetReader::new_with_ts(stream, syntax) else {
        return Ok(());
    };
    // The sequences entered, each marked when it holds pixel data fragments rather than items
    // of elements: dicom-object stops a header read at the top level only.
    let mut open: Vec<bool> = Vec::new();
    for token in reader {
        let Ok(token) = token else {
            return Ok(());
        };
        let stops = |tag: Tag| header_only && open.is_empty() && tag >= tags::PIXEL_DATA;
        // The tokens after which the reader reads a value as long as the header says.
        let (tag, declared) = match token {
            DataToken::ElementHeader(header) if stops(header.tag) => return Ok(()),
            DataToken::ElementHeader(header) => (header.tag, header.len),
            DataToken::SequenceStart { tag, .. } if stops(tag) => return Ok(()),
            DataToken::PixelSequenceStart if stops(tags::PIXEL_DATA) => return Ok(()),
            DataToken::SequenceStart { .. } => {
                open.push(false);
                continue;
            }
            DataToken::PixelSequenceStart => {
                open.push(true);
                continue;
            }
            DataToken::SequenceEnd => {
                open.pop();
                continue;
            }
            DataToken::ItemStart { len } if open.last() == Some(&true) => {
                (Tag(0xFFFE, 0xE000), len)
            }
            _ => continue,
        };
        if let Some(declared) = declared.get()
            && u64::from(declared) > left()
        {
            return Err(too_long(tag, declared, left()));
        }
    }
    Ok(())
}

/// A reader that counts the bytes it delivers.
struct Counted<'a, R> {
    inner: R,
    count: &'a Cell<u64>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

pub(crate) fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    let value = obj.get(tag)?.to_str().ok()?;
    let value = value.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!value.is_empty()).then(|| value.to_string())
}

pub(crate) fn floats<const N: usize>(
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    path: &Path,
    name: &str,
) -> Result<Option<[f64; N]>, ReadError> {
    let Some(element) = obj.get(tag) else {
        return Ok(None);
    };
    let values = element
        .to_multi_float64()
        .map_err(|e| ReadError::new(path, format!("{name} is not numeric: {e}")))?;
    let array: [f64; N] = values.as_slice().try_into().map_err(|_| {
        ReadError::new(
            path,
            format!("{name} has {} values, expected {N}", values.len()),
        )
    })?;
    if array.iter().any(|v| !v.is_finite()) {
        return Err(ReadError::new(path, format!("{name} is not finite")));
    }
    Ok(Some(array))
}

pub(crate) fn uint(
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    path: &Path,
    name: &str,
) -> Result<Option<usize>, ReadError> {
    match obj.get(tag) {
        None => Ok(None),
        Some(e) => e
            .to_int::<u32>()
            .map(|v| Some(v as usize))
            .map_err(|err| ReadError::new(path, format!("{name} is not a number: {err}"))),
    }
}

pub(crate) fn read_slice_header(
    path: &Path,
    obj: &DefaultDicomObject,
) -> Result<SliceHeader, ReadError> {
    let required = |name: &str, value: Option<usize>| {
        value
            .filter(|&v| v > 0)
            .ok_or_else(|| ReadError::new(path, format!("no {name}: not an image")))
    };
    Ok(SliceHeader {
        path: path.to_path_buf(),
        series_uid: text(obj, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
        modality: text(obj, tags::MODALITY),
        rows: required("Rows", uint(obj, tags::ROWS, path, "Rows")?)?,
        columns: required("Columns", uint(obj, tags::COLUMNS, path, "Columns")?)?,
        orientation: floats(
            obj,
            tags::IMAGE_ORIENTATION_PATIENT,
            path,
            "Image Orientation (Patient)",
        )?,
        position: floats(
            obj,
            tags::IMAGE_POSITION_PATIENT,
            path,
            "Image Position (Patient)",
        )?,
        pixel_spacing: floats(obj, tags::PIXEL_SPACING, path, "Pixel Spacing")?,
        slice_thickness: obj
            .get(tags::SLICE_THICKNESS)
            .and_then(|e| e.to_float64().ok())
            .filter(|v| v.is_finite() && *v > 0.0),
        frames: uint(obj, tags::NUMBER_OF_FRAMES, path, "Number of Frames")?.unwrap_or(1),
        sop_class_uid: text(obj, tags::SOP_CLASS_UID),
        sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID),
        frame_of_reference_uid: text(obj, tags::FRAME_OF_REFERENCE_UID),
    })
}

/// The DICOM files of a folder (not recursing; hidden files and DICOMDIR left out), or the one
/// file given.
pub fn dicom_files(path: &Path) -> Result<Vec<PathBuf>, ReadError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| ReadError::new(path, e.to_string()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            !name.starts_with('.') && name != "DICOMDIR"
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ReadError::new(path, "no files in this folder"));
    }
    Ok(files)
}

/// Reads the CT series in `path` (a folder of slices, or one file).
pub fn read_series(path: &Path) -> Result<CtImage, ReadError> {
    let mut headers = Vec::new();
    for file in dicom_files(path)? {
        let obj = open_header(&file)?;
        let header = read_slice_header(&file, &obj)?;
        if header
            .modality
            .as_deref()
            .is_some_and(|m| NON_IMAGE_MODALITIES.contains(&m))
        {
            continue;
        }
        headers.push(header);
    }
    let Some(first) = headers.first() else {
        return Err(ReadError::new(
            path,
            "no image files (only segmentations or reports)",
        ));
    };
    let series_uid = first.series_uid.clone();
    let mut series: Vec<&str> = headers.iter().map(|h| h.series_uid.as_str()).collect();
    series.sort();
    series.dedup();
    if series.len() > 1 {
        return Err(ReadError::new(
            path,
            format!(
                "holds {} series; put each series in a folder of its own",
                series.len()
            ),
        ));
    }
    let (geometry, order) = series_geometry(path, &headers)?;
    let mut voxels = Vec::new();
    let mut padding_hu = None;
    for &i in &order {
        let header = &headers[i];
        let (slice, padding) = read_hu(&header.path, header.rows * header.columns)?;
        if voxels.is_empty() {
            // Reserved from a slice actually read: the headers alone can promise 65535x65535
            // pixels a slice in a few hundred bytes.
            voxels.reserve_exact(slice.len().saturating_mul(order.len()));
        }
        if padding.is_some() {
            padding_hu = padding;
        }
        voxels.extend(slice);
    }
    let stack = SeriesStack {
        grid: geometry.clone(),
        instances: order
            .iter()
            .map(|&i| Instance {
                path: headers[i].path.clone(),
                sop_class_uid: headers[i].sop_class_uid.clone(),
                sop_instance_uid: headers[i].sop_instance_uid.clone(),
                position: headers[i].position,
            })
            .collect(),
        frame_of_reference_uid: headers[0].frame_of_reference_uid.clone(),
    };
    let volume = Volume::new(geometry, voxels).map_err(|e| ReadError::new(path, e.to_string()))?;
    Ok(CtImage {
        volume: volume.into_canonical(),
        padding_hu,
        modality: headers[0].modality.clone(),
        series_uid,
        stack,
    })
}

/// The grid of a stack of single-frame slices and the order (indices into `headers`) in which
/// they lie along the slice normal.
pub(crate) fn series_geometry(
    path: &Path,
    headers: &[SliceHeader],
) -> Result<(Geometry, Vec<usize>), ReadError> {
    let first = &headers[0];
    for h in headers {
        if h.frames != 1 {
            return Err(ReadError::new(
                &h.path,
                format!(
                    "multi-frame image ({} frames): only single-frame CT series are read",
                    h.frames
                ),
            ));
        }
        if (h.rows, h.columns) != (first.rows, first.columns) {
            return Err(ReadError::new(
                &h.path,
                format!(
                    "{}x{} pixels while {} has {}x{}",
                    h.columns,
                    h.rows,
                    first.path.display(),
                    first.columns,
                    first.rows
                ),
            ));
        }
    }
    let orientation = match first.orientation {
        Some(o) => o,
        None if headers.len() == 1 => [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        None => {
            return Err(ReadError::new(
                &first.path,
                "no Image Orientation (Patient): cannot order the slices",
            ));
        }
    };
    let row = unit([orientation[0], orientation[1], orientation[2]]);
    let column = unit([orientation[3], orientation[4], orientation[5]]);
    let (Some(row), Some(column)) = (row, column) else {
        return Err(ReadError::new(
            &first.path,
            "Image Orientation (Patient) has a zero vector",
        ));
    };
    if dot(row, column).abs() > 1e-3 {
        return Err(ReadError::new(
            &first.path,
            "Image Orientation (Patient) vectors are not perpendicular",
        ));
    }
    let normal = cross(row, column);
    for h in headers {
        if let Some(o) = h.orientation
            && (0..6).any(|i| (o[i] - orientation[i]).abs() > 1e-4)
        {
            return Err(ReadError::new(
                &h.path,
                "orientation differs from the rest of the series (a localizer mixed in?)",
            ));
        }
    }
    let pixel_spacing = first.pixel_spacing.unwrap_or([1.0, 1.0]);
    if pixel_spacing.iter().any(|&s| s <= 0.0) {
        return Err(ReadError::new(&first.path, "Pixel Spacing is not positive"));
    }
    let mut placed = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        match h.position {
            Some(p) => placed.push((dot(p, normal), i)),
            None if headers.len() == 1 => placed.push((0.0, i)),
            None => {
                return Err(ReadError::new(
                    &h.path,
                    "no Image Position (Patient): cannot place the slice",
                ));
            }
        }
    }
    placed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gaps: Vec<f64> = placed.windows(2).map(|w| w[1].0 - w[0].0).collect();
    if let Some(k) = gaps.iter().position(|&g| g < 1e-3) {
        return Err(ReadError::new(
            &headers[placed[k + 1].1].path,
            format!(
                "at the same position as {} (a duplicate slice or two series with one UID)",
                headers[placed[k].1].path.display()
            ),
        ));
    }
    let slice_spacing = if gaps.is_empty() {
        first.slice_thickness.unwrap_or(1.0)
    } else {
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let typical = sorted[sorted.len() / 2];
        if let Some(k) = gaps
            .iter()
            .position(|g| (g - typical).abs() > SPACING_TOLERANCE * typical)
        {
            return Err(ReadError::new(
                path,
                format!(
                    "uneven slice spacing: {typical:.4} mm between most slices but {:.4} mm between {} and {} (a missing slice?)",
                    gaps[k],
                    file_name(&headers[placed[k].1].path),
                    file_name(&headers[placed[k + 1].1].path),
                ),
            ));
        }
        // The mean over the whole stack is the least sensitive to rounded positions.
        (placed[placed.len() - 1].0 - placed[0].0) / gaps.len() as f64
    };
    let origin = headers[placed[0].1].position.unwrap_or([0.0; 3]);
    let geometry = Geometry {
        size: [first.columns, first.rows, headers.len()],
        spacing: [pixel_spacing[1], pixel_spacing[0], slice_spacing],
        origin,
        direction: [row, column, normal],
    };
    Ok((geometry, placed.into_iter().map(|(_, i)| i).collect()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn unit(v: [f64; 3]) -> Option<[f64; 3]> {
    let n = dot(v, v).sqrt();
    (n > 1e-6).then(|| v.map(|c| c / n))
}

/// One slice's voxels in HU, and the HU value of its padding, if it declares one.
fn read_hu(path: &Path, expected: usize) -> Result<(Vec<f32>, Option<f32>), ReadError> {
    let obj = open_full_object(path)?;
    let signed = uint(
        &obj,
        tags::PIXEL_REPRESENTATION,
        path,
        "Pixel Representation",
    )?
    .unwrap_or(0)
        == 1;
    let stored = match obj.get(tags::PIXEL_DATA).map(|e| e.value()) {
        None => return Err(ReadError::new(path, "no Pixel Data")),
        // Native (uncompressed) pixels are read here: minimal headers (no High Bit, say) are
        // common in exports and need only Bits Allocated and Pixel Representation.
        Some(dicom_core::DicomValue::Primitive(value)) => {
            let bits = uint(&obj, tags::BITS_ALLOCATED, path, "Bits Allocated")?.unwrap_or(16);
            let bits_stored = uint(&obj, tags::BITS_STORED, path, "Bits Stored")?.unwrap_or(bits);
            native_samples(&value.to_bytes(), bits, bits_stored, signed, expected)
                .map_err(|e| ReadError::new(path, e))?
        }
        Some(dicom_core::DicomValue::PixelSequence(sequence))
            if obj.meta().transfer_syntax() == uids::RLE_LOSSLESS =>
        {
            let samples = uint(&obj, tags::SAMPLES_PER_PIXEL, path, "Samples per Pixel")?;
            if samples.is_some_and(|n| n != 1) {
                return Err(ReadError::new(
                    path,
                    "colour image: a CT slice has one sample per pixel",
                ));
            }
            let bits = uint(&obj, tags::BITS_ALLOCATED, path, "Bits Allocated")?.unwrap_or(16);
            let bits_stored = uint(&obj, tags::BITS_STORED, path, "Bits Stored")?.unwrap_or(bits);
            rle_samples(sequence.fragments(), bits, bits_stored, signed, expected)
                .map_err(|e| ReadError::new(path, e))?
        }
        Some(_) => {
            let syntax = obj
                .meta()
                .transfer_syntax()
                .trim_end_matches('\0')
                .to_string();
            let decoded = obj.decode_pixel_data().map_err(|e| {
                ReadError::new(
                    path,
                    format!("cannot decode pixel data (transfer syntax {syntax}): {e}"),
                )
            })?;
            if decoded.samples_per_pixel() != 1 {
                return Err(ReadError::new(
                    path,
                    "colour image: a CT slice has one sample per pixel",
                ));
            }
            let options = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
            decoded
                .to_vec_with_options(&options)
                .map_err(|e| ReadError::new(path, format!("cannot convert pixel data: {e}")))?
        }
    };
    if stored.len() != expected {
        return Err(ReadError::new(
            path,
            format!(
                "pixel data holds {} values, the header promises {expected}",
                stored.len()
            ),
        ));
    }
    let number = |tag, default: f64| {
        obj.get(tag)
            .and_then(|e| e.to_float64().ok())
            .filter(|v| v.is_finite())
            .unwrap_or(default)
    };
    let slope = number(tags::RESCALE_SLOPE, 1.0);
    let intercept = number(tags::RESCALE_INTERCEPT, 0.0);
    let slope = if slope == 0.0 { 1.0 } else { slope };
    let padding = obj
        .get(tags::PIXEL_PADDING_VALUE)
        .and_then(|e| e.to_int::<i32>().ok())
        .map(|v| v as f64);
    // Pixel Padding Value is written with the VR of the pixels: as US it reads 63536 for -2000.
    let padding = padding.map(|p| {
        if signed && p >= 32768.0 {
            p - 65536.0
        } else {
            p
        }
    });
    let hu = stored
        .iter()
        .map(|&v| (v * slope + intercept) as f32)
        .collect();
    Ok((hu, padding.map(|p| (p * slope + intercept) as f32)))
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
fn native_samples(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A length field damaged into gigabytes is refused from the bytes left in the file, before
    /// dicom-object allocates what it declares.
    #[test]
    fn a_value_longer_than_its_file_is_refused_before_it_is_read() {
        let real = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../data/readers/dicom/pydicom_CT_small.dcm"),
        )
        .unwrap();
        let pixel_data = real
            .windows(6)
            .position(|w| w == b"\xe0\x7f\x10\x00OW")
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let damaged = |name: &str, length_at: usize| {
            let mut bytes = real.clone();
            bytes[length_at..length_at + 4].copy_from_slice(&0xF000_0000u32.to_le_bytes());
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let declared = "declares a value of 4026531840 bytes";

        let pixels = damaged("pixels.dcm", pixel_data + 8);
        // The header stops before Pixel Data, as dicom-object's header read does.
        open_header(&pixels).unwrap();
        let err = read_series(&pixels).unwrap_err();
        assert!(
            err.message.contains(&format!("(7FE0,0010) {declared}")),
            "{err}"
        );

        // (0002,0001) in the file meta group, right after the group length.
        let meta = damaged("meta.dcm", 132 + 12 + 8);
        let err = open_header(&meta).unwrap_err();
        assert!(
            err.message.contains(&format!("(0002,0001) {declared}")),
            "{err}"
        );
    }
}
