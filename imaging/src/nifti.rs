//! NIfTI-1 single files (.nii, .nii.gz): reading any of the common voxel types into a canonical
//! [`Volume`], and writing HU images and label maps.
//!
//! Our own code rather than a crate: the format is one fixed 348-byte header, and a reader that
//! is handed files from outside has to check every field against the file before it trusts it.
//! A header may lie about its size; nothing is allocated for voxels until the file (or, for
//! gzip, the decompressed stream) has been seen to hold them.
//!
//! NIfTI affines map voxels to RAS (+x towards the patient's right, +y anterior); LPS differs
//! only in the sign of x and y, so every affine is turned into LPS before it becomes a
//! [`Geometry`], and back into RAS when written.
//!
//! One format, read and written: about 640 lines of code (the header's fields, its affine and
//! quaternion geometry, bounded reading of plain and gzip files, the writer) and 370 of tests.
//! The header codec with its geometry is the seam along which it would split next.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use crate::{Geometry, ReadError, Volume};

/// NIfTI-1's `sizeof_hdr`; also how the byte order is told apart.
const HEADER_SIZE: usize = 348;
/// NIfTI-2's `sizeof_hdr`, recognised only to say that it is not supported.
const NIFTI2_HEADER_SIZE: i32 = 540;
/// Where a written file's voxels start: the header plus the four-byte "no extensions" flag.
const WRITE_DATA_OFFSET: usize = 352;

const NIFTI_UNITS_MM: u8 = 2;
const NIFTI_XFORM_SCANNER_ANAT: i16 = 1;

/// Reads a NIfTI-1 image (any supported voxel type, scaling applied) as floats on a canonical
/// grid. Non-finite voxel values are refused: nothing downstream can use them.
pub fn read_image(path: &Path) -> Result<Volume<f32>, ReadError> {
    Ok(read_image_and_grid(path)?.0)
}

/// [`read_image`], and the grid of the file itself (its own axis order), on which outputs go
/// to overlay the file voxel for voxel.
pub fn read_image_and_grid(path: &Path) -> Result<(Volume<f32>, Geometry), ReadError> {
    let volume = read_volume(path, |value| {
        let value = value as f32;
        value
            .is_finite()
            .then_some(value)
            .ok_or_else(|| "is not a finite number (or does not fit a 32-bit float)".to_string())
    })?;
    let grid = volume.geometry.clone();
    Ok((volume.into_canonical(), grid))
}

/// Reads a NIfTI-1 label map on a canonical grid. Every voxel (after scaling) must be a whole
/// number from 0 to 65535; the first one that is not is named in the error.
pub fn read_labels(path: &Path) -> Result<Volume<u16>, ReadError> {
    read_volume(path, |value| {
        if (0.0..=f64::from(u16::MAX)).contains(&value) && value.fract() == 0.0 {
            Ok(value as u16)
        } else {
            Err("is not a label (labels are whole numbers from 0 to 65535)".to_string())
        }
    })
    .map(Volume::into_canonical)
}

/// A voxel type [`write`] can store; the NIfTI datatype follows from the Rust type (int16 for
/// HU images, uint8 for label maps).
pub trait NiftiVoxel: Copy + encode::Encode {}

impl NiftiVoxel for i16 {}
impl NiftiVoxel for u8 {}

mod encode {
    /// Kept out of the public trait so that the byte layout stays this module's business.
    pub trait Encode {
        const DATATYPE: i16;
        const BYTES: usize;
        fn encode(self, big_endian: bool, out: &mut Vec<u8>);
    }

    impl Encode for i16 {
        const DATATYPE: i16 = 4;
        const BYTES: usize = 2;
        fn encode(self, big_endian: bool, out: &mut Vec<u8>) {
            out.extend_from_slice(&if big_endian {
                self.to_be_bytes()
            } else {
                self.to_le_bytes()
            });
        }
    }

    impl Encode for u8 {
        const DATATYPE: i16 = 2;
        const BYTES: usize = 1;
        fn encode(self, _big_endian: bool, out: &mut Vec<u8>) {
            out.push(self);
        }
    }
}

/// Writes `volume` as a little-endian NIfTI-1 single file, gzip-compressed when `path` ends in
/// `.gz`. Both sform and qform (code 1, scanner anatomical) carry the geometry, turned from LPS
/// to NIfTI's RAS; units are millimetres. A volume that NIfTI cannot describe (an axis over
/// 32767 voxels, a non-finite geometry) is refused with `InvalidInput`.
pub fn write<T: NiftiVoxel>(path: &Path, volume: &Volume<T>) -> io::Result<()> {
    write_described(path, volume, "Alveolus")
}

/// [`write`] with `description` in the header's `descrip` field (ASCII, cut to 79 bytes), which
/// viewers show as the file's description.
pub fn write_described<T: NiftiVoxel>(
    path: &Path,
    volume: &Volume<T>,
    description: &str,
) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let header = encode_header(volume, description, false)
        .map_err(|message| with_path(io::Error::new(io::ErrorKind::InvalidInput, message)))?;
    let file = File::create(path).map_err(with_path)?;
    let gzip = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    // The voxels are encoded a chunk at a time: no second copy of the volume in memory.
    let write_all = |writer: &mut dyn Write| -> io::Result<()> {
        writer.write_all(&header)?;
        let mut buffer = Vec::with_capacity(VOXELS_PER_WRITE * T::BYTES);
        for chunk in volume.voxels.chunks(VOXELS_PER_WRITE) {
            buffer.clear();
            for &v in chunk {
                v.encode(false, &mut buffer);
            }
            writer.write_all(&buffer)?;
        }
        Ok(())
    };
    let result = if gzip {
        let mut encoder = GzEncoder::new(BufWriter::new(file), Compression::default());
        write_all(&mut encoder)
            .and_then(|()| encoder.finish())
            .and_then(|mut w| w.flush())
    } else {
        let mut writer = BufWriter::new(file);
        write_all(&mut writer).and_then(|()| writer.flush())
    };
    result.map_err(with_path)
}

/// Voxels encoded per write while a file is written.
const VOXELS_PER_WRITE: usize = 1 << 16;

/// NIfTI affines map voxels to RAS; ours to LPS. The two differ in the sign of x and y.
const RAS_TO_LPS: [f64; 3] = [-1.0, -1.0, 1.0];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Datatype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl Datatype {
    fn from_code(code: i16) -> Result<Self, String> {
        Ok(match code {
            2 => Self::U8,
            256 => Self::I8,
            4 => Self::I16,
            512 => Self::U16,
            8 => Self::I32,
            768 => Self::U32,
            16 => Self::F32,
            64 => Self::F64,
            _ => {
                let name = match code {
                    0 => "unknown",
                    1 => "binary",
                    32 => "complex64",
                    128 => "rgb24",
                    1024 => "int64",
                    1280 => "uint64",
                    1536 => "float128",
                    1792 => "complex128",
                    2048 => "complex256",
                    2304 => "rgba32",
                    _ => "not a NIfTI datatype",
                };
                return Err(format!(
                    "datatype {code} ({name}) is not supported; the voxels must be uint8, int8, \
                     int16, uint16, int32, uint32, float32 or float64"
                ));
            }
        })
    }

    fn bytes(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::U8 => "uint8",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::U16 => "uint16",
            Self::I32 => "int32",
            Self::U32 => "uint32",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }
}

/// The header fields this reader uses, checked for consistency but not yet against the file.
#[derive(Debug)]
struct Header {
    big_endian: bool,
    size: [usize; 3],
    datatype: Datatype,
    /// Where the voxels start, in bytes from the start of the (decompressed) file.
    vox_offset: usize,
    /// Bytes of voxel data the header describes.
    data_bytes: usize,
    /// `(slope, intercept)` when the file asks for scaling.
    scaling: Option<(f64, f64)>,
    /// The voxel-to-RAS affine (top three rows) and which header fields it came from.
    affine: [[f64; 4]; 3],
    affine_source: &'static str,
}

/// Reads fields of a header in its byte order.
struct Fields<'a> {
    bytes: &'a [u8; HEADER_SIZE],
    big_endian: bool,
}

impl Fields<'_> {
    fn array<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut a = [0; N];
        a.copy_from_slice(&self.bytes[offset..offset + N]);
        a
    }

    fn i16(&self, offset: usize) -> i16 {
        let a = self.array(offset);
        if self.big_endian {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }

    fn f32(&self, offset: usize) -> f64 {
        let a = self.array(offset);
        f64::from(if self.big_endian {
            f32::from_be_bytes(a)
        } else {
            f32::from_le_bytes(a)
        })
    }

    fn f32s<const N: usize>(&self, offset: usize) -> [f64; N] {
        std::array::from_fn(|i| self.f32(offset + 4 * i))
    }
}

fn parse_header(bytes: &[u8; HEADER_SIZE]) -> Result<Header, String> {
    let sizeof_hdr = [0, 1, 2, 3].map(|i| bytes[i]);
    let (little, big) = (
        i32::from_le_bytes(sizeof_hdr),
        i32::from_be_bytes(sizeof_hdr),
    );
    let big_endian = if little == HEADER_SIZE as i32 {
        false
    } else if big == HEADER_SIZE as i32 {
        true
    } else if little == NIFTI2_HEADER_SIZE || big == NIFTI2_HEADER_SIZE {
        return Err("NIfTI-2 is not supported (header size 540); save it as NIfTI-1".into());
    } else {
        return Err(format!(
            "not a NIfTI-1 file: the header size field is {little}, not 348"
        ));
    };
    let f = Fields { bytes, big_endian };

    match &bytes[344..348] {
        b"n+1\0" => {}
        b"ni1\0" => {
            return Err(
                "this is the header of a NIfTI-1 .hdr/.img pair (magic \"ni1\"), which is not \
                 supported; convert it to a single .nii or .nii.gz file"
                    .into(),
            );
        }
        other => {
            return Err(format!(
                "bad NIfTI-1 magic \"{}\" (expected \"n+1\")",
                other.escape_ascii()
            ));
        }
    }

    let dim: [i16; 8] = std::array::from_fn(|i| f.i16(40 + 2 * i));
    let ndim = dim[0];
    if !(3..=7).contains(&ndim) {
        return Err(if (1..3).contains(&ndim) {
            format!("dim[0] = {ndim}: a {ndim}-D image, not a 3-D volume")
        } else {
            format!("dim[0] = {ndim} is not a number of dimensions (1 to 7)")
        });
    }
    for (i, &d) in dim.iter().enumerate().take(ndim as usize + 1).skip(1) {
        if d < 1 {
            return Err(format!(
                "dim[{i}] = {d}: every axis needs at least one voxel"
            ));
        }
    }
    let extra = &dim[4..=ndim as usize];
    let volumes: u64 = extra.iter().map(|&d| d as u64).product();
    if volumes > 1 {
        return Err(format!(
            "the file holds {volumes} volumes (dim[4..{ndim}] = {extra:?}); only a single 3-D \
             volume can be read"
        ));
    }
    let size = [dim[1], dim[2], dim[3]].map(|d| d as usize);

    let datatype = Datatype::from_code(f.i16(70))?;
    let data_bytes = size
        .iter()
        .try_fold(datatype.bytes(), |n, &d| n.checked_mul(d))
        .ok_or("the dimensions overflow the address space")?;

    let vox_offset = f.f32(108);
    if !vox_offset.is_finite()
        || vox_offset < HEADER_SIZE as f64
        || vox_offset.fract() != 0.0
        || vox_offset > u32::MAX as f64
    {
        return Err(format!(
            "vox_offset = {vox_offset} is not a byte offset after the 348-byte header"
        ));
    }
    let vox_offset = vox_offset as usize;

    let (slope, inter) = (f.f32(112), f.f32(116));
    let scaling = (slope.is_finite() && slope != 0.0 && (slope, inter) != (1.0, 0.0))
        .then_some((slope, if inter.is_finite() { inter } else { 0.0 }));

    let (affine, affine_source) = ras_affine(&f)?;
    Ok(Header {
        big_endian,
        size,
        datatype,
        vox_offset,
        data_bytes,
        scaling,
        affine,
        affine_source,
    })
}

/// The voxel-to-RAS affine by NIfTI's rules: sform when it is set, else qform, else the voxel
/// sizes alone (ANALYZE's method).
fn ras_affine(f: &Fields) -> Result<([[f64; 4]; 3], &'static str), String> {
    let (qform_code, sform_code) = (f.i16(252), f.i16(254));
    let pixdim: [f64; 8] = f.f32s(76);
    let voxel_sizes = || -> Result<[f64; 3], String> {
        let sizes = [pixdim[1], pixdim[2], pixdim[3]];
        for (i, s) in sizes.iter().enumerate() {
            if !s.is_finite() || *s <= 0.0 {
                return Err(format!("pixdim[{}] = {s} is not a voxel size", i + 1));
            }
        }
        Ok(sizes)
    };
    let (affine, source) = if sform_code > 0 {
        let rows = [f.f32s::<4>(280), f.f32s::<4>(296), f.f32s::<4>(312)];
        (rows, "sform (srow_x/y/z)")
    } else if qform_code > 0 {
        let [b, c, d, x, y, z] = f.f32s::<6>(256);
        let sizes = voxel_sizes()?;
        if ![b, c, d, x, y, z].iter().all(|v| v.is_finite()) {
            return Err("the qform quaternion or offset holds a non-finite number".into());
        }
        let rotation = quaternion_to_rotation(b, c, d);
        let qfac = if pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let scale = [sizes[0], sizes[1], sizes[2] * qfac];
        let mut rows = [[0.0; 4]; 3];
        for (r, row) in rows.iter_mut().enumerate() {
            for a in 0..3 {
                row[a] = rotation[r][a] * scale[a];
            }
        }
        rows[0][3] = x;
        rows[1][3] = y;
        rows[2][3] = z;
        (rows, "qform (quaternion, pixdim and qoffset)")
    } else {
        let [x, y, z] = voxel_sizes()?;
        (
            [[x, 0.0, 0.0, 0.0], [0.0, y, 0.0, 0.0], [0.0, 0.0, z, 0.0]],
            "pixdim (no sform or qform)",
        )
    };
    if !affine.iter().flatten().all(|v| v.is_finite()) {
        return Err(format!("the {source} affine holds a non-finite number"));
    }
    Ok((affine, source))
}

/// NIfTI's quaternion (b, c, d; a implied) to a rotation matrix, as nifti1_io does it: a
/// quaternion longer than 1 is normalised and taken as a 180-degree rotation.
fn quaternion_to_rotation(b: f64, c: f64, d: f64) -> [[f64; 3]; 3] {
    let sum = b * b + c * c + d * d;
    let (a, b, c, d) = if 1.0 - sum < 1e-7 {
        let norm = sum.sqrt();
        (0.0, b / norm, c / norm, d / norm)
    } else {
        ((1.0 - sum).sqrt(), b, c, d)
    };
    [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ]
}

/// A rotation matrix (columns: axis directions) to NIfTI's (b, c, d), nifti1_io's method.
fn rotation_to_quaternion(r: [[f64; 3]; 3]) -> [f64; 3] {
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (a, b, c, d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
    }
    // NIfTI stores only b, c, d and takes a >= 0.
    if a < 0.0 { [-b, -c, -d] } else { [b, c, d] }
}

/// Reads the whole file's header and voxel bytes, refusing before any large allocation when
/// the file cannot hold what the header describes.
fn read_header_and_data(path: &Path) -> Result<(Header, Vec<u8>), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open the file: {e}"))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot read the file's size: {e}"))?
        .len();
    let mut magic = [0u8; 2];
    let got = read_up_to(&mut file, &mut magic).map_err(|e| format!("cannot read: {e}"))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read: {e}"))?;
    if got == 2 && magic == [0x1f, 0x8b] {
        read_gzip(file)
    } else {
        read_plain(file, file_len)
    }
}

fn read_plain(mut file: File, file_len: u64) -> Result<(Header, Vec<u8>), String> {
    let mut bytes = [0u8; HEADER_SIZE];
    let got = read_up_to(&mut file, &mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if got < HEADER_SIZE {
        return Err(format!(
            "the file is {got} bytes, shorter than a NIfTI-1 header (348 bytes)"
        ));
    }
    let header = parse_header(&bytes)?;
    let needed = header.vox_offset as u64 + header.data_bytes as u64;
    if file_len < needed {
        return Err(truncated(&header, "the file", file_len));
    }
    file.seek(SeekFrom::Start(header.vox_offset as u64))
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut data = vec![0u8; header.data_bytes];
    file.read_exact(&mut data)
        .map_err(|e| format!("cannot read the voxel data: {e}"))?;
    Ok((header, data))
}

fn read_gzip(file: File) -> Result<(Header, Vec<u8>), String> {
    let corrupt = |e: io::Error| format!("the gzip stream is corrupt: {e}");
    let mut decoder = MultiGzDecoder::new(BufReader::new(file));
    let mut bytes = [0u8; HEADER_SIZE];
    let got = read_up_to(&mut decoder, &mut bytes).map_err(corrupt)?;
    if got < HEADER_SIZE {
        return Err(format!(
            "the decompressed file is {got} bytes, shorter than a NIfTI-1 header (348 bytes)"
        ));
    }
    let header = parse_header(&bytes)?;
    // Reading stops where the header says the voxels end, and the buffer only grows as data
    // actually arrives, so a header that lies about its size costs nothing.
    let wanted = (header.vox_offset - HEADER_SIZE) as u64 + header.data_bytes as u64;
    let mut rest = Vec::new();
    decoder
        .take(wanted)
        .read_to_end(&mut rest)
        .map_err(corrupt)?;
    if (rest.len() as u64) < wanted {
        let have = (HEADER_SIZE + rest.len()) as u64;
        return Err(truncated(&header, "the decompressed file", have));
    }
    rest.drain(..header.vox_offset - HEADER_SIZE);
    Ok((header, rest))
}

fn truncated(header: &Header, what: &str, have: u64) -> String {
    let [x, y, z] = header.size;
    format!(
        "truncated: the header describes {x}x{y}x{z} {} voxels ({} bytes from byte {}), but \
         {what} has only {have} bytes",
        header.datatype.name(),
        header.data_bytes,
        header.vox_offset,
    )
}

/// Fills as much of `buf` as the reader has; fewer bytes only at the end of the stream.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The file's voxels on the file's own grid.
fn read_volume<T: Copy>(
    path: &Path,
    convert: impl Fn(f64) -> Result<T, String>,
) -> Result<Volume<T>, ReadError> {
    let fail = |message: String| ReadError::new(path, message);
    let (header, data) = read_header_and_data(path).map_err(fail)?;
    let voxels = decode(&header, &data, convert).map_err(|(index, value, why)| {
        let [x, y, _] = header.size;
        fail(format!(
            "voxel ({}, {}, {}) of the file holds {value}, which {why}",
            index % x,
            (index / x) % y,
            index / (x * y)
        ))
    })?;
    let mut lps = header.affine;
    for (row, sign) in lps.iter_mut().zip(RAS_TO_LPS) {
        for v in row.iter_mut() {
            *v *= sign;
        }
    }
    let geometry = Geometry::from_lps_affine(header.size, lps)
        .map_err(|e| fail(format!("the {}: {e}", header.affine_source)))?;
    Volume::new(geometry, voxels).map_err(|e| fail(e.to_string()))
}

/// Turns voxel bytes into values (scaling applied); on failure, the voxel's index, its value
/// and what is wrong with it.
fn decode<T>(
    header: &Header,
    data: &[u8],
    convert: impl Fn(f64) -> Result<T, String>,
) -> Result<Vec<T>, (usize, f64, String)> {
    let mut out = Vec::with_capacity(data.len() / header.datatype.bytes());
    let (slope, inter) = header.scaling.unwrap_or((1.0, 0.0));
    let big_endian = header.big_endian;
    macro_rules! run {
        ($t:ty) => {{
            const N: usize = size_of::<$t>();
            for (index, chunk) in data.chunks_exact(N).enumerate() {
                let mut a = [0u8; N];
                a.copy_from_slice(chunk);
                let raw = if big_endian {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                };
                let value = f64::from(raw) * slope + inter;
                out.push(convert(value).map_err(|why| (index, value, why))?);
            }
        }};
    }
    match header.datatype {
        Datatype::U8 => run!(u8),
        Datatype::I8 => run!(i8),
        Datatype::I16 => run!(i16),
        Datatype::U16 => run!(u16),
        Datatype::I32 => run!(i32),
        Datatype::U32 => run!(u32),
        Datatype::F32 => run!(f32),
        Datatype::F64 => run!(f64),
    }
    Ok(out)
}

/// The whole file's bytes (header, empty extension flag, voxels) in either byte order.
#[cfg(test)]
fn encode_file<T: NiftiVoxel>(
    volume: &Volume<T>,
    description: &str,
    big_endian: bool,
) -> Result<Vec<u8>, String> {
    let mut bytes = encode_header(volume, description, big_endian)?;
    bytes.reserve(volume.voxels.len() * T::BYTES);
    for &v in &volume.voxels {
        v.encode(big_endian, &mut bytes);
    }
    Ok(bytes)
}

/// The header and the empty extension flag: the bytes before the voxels.
fn encode_header<T: NiftiVoxel>(
    volume: &Volume<T>,
    description: &str,
    big_endian: bool,
) -> Result<Vec<u8>, String> {
    let g = &volume.geometry;
    if volume.voxels.len() != g.voxel_count() {
        return Err(format!(
            "{} voxels for a {:?} grid",
            volume.voxels.len(),
            g.size
        ));
    }
    let mut dims = [0i16; 3];
    for (axis, (dim, &n)) in dims.iter_mut().zip(&g.size).enumerate() {
        *dim = i16::try_from(n)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| format!("axis {axis} has {n} voxels; NIfTI-1 allows 1 to 32767"))?;
    }
    let finite = g.is_finite();
    if !finite || g.spacing.iter().any(|&s| s <= 0.0) {
        return Err(format!("the geometry cannot be written: {g:?}"));
    }

    // Column a of the RAS affine is axis a's direction times its spacing.
    let rotation: [[f64; 3]; 3] =
        std::array::from_fn(|r| std::array::from_fn(|a| g.direction[a][r] * RAS_TO_LPS[r]));
    let mut srow = [[0.0; 4]; 3];
    for r in 0..3 {
        for a in 0..3 {
            srow[r][a] = rotation[r][a] * g.spacing[a];
        }
        srow[r][3] = g.origin[r] * RAS_TO_LPS[r];
    }
    // The qform must be a proper rotation; a left-handed grid flips its third axis via qfac.
    let mut proper = rotation;
    let qfac = if determinant(rotation) < 0.0 {
        for row in proper.iter_mut() {
            row[2] = -row[2];
        }
        -1.0
    } else {
        1.0
    };
    let [b, c, d] = rotation_to_quaternion(proper);

    let mut h = HeaderWriter {
        bytes: vec![0u8; WRITE_DATA_OFFSET],
        big_endian,
    };
    h.i32(0, HEADER_SIZE as i32);
    h.i16(40, 3);
    for (i, &dim) in dims.iter().enumerate() {
        h.i16(42 + 2 * i, dim);
    }
    for i in 4..8 {
        h.i16(40 + 2 * i, 1);
    }
    h.i16(70, T::DATATYPE);
    h.i16(72, 8 * T::BYTES as i16);
    h.f32(76, qfac);
    for a in 0..3 {
        h.f32(80 + 4 * a, g.spacing[a]);
    }
    h.f32(108, WRITE_DATA_OFFSET as f64);
    h.f32(112, 1.0);
    h.f32(116, 0.0);
    h.bytes[123] = NIFTI_UNITS_MM;
    let description: Vec<u8> = description
        .bytes()
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .take(79)
        .collect();
    h.bytes[148..148 + description.len()].copy_from_slice(&description);
    h.i16(252, NIFTI_XFORM_SCANNER_ANAT);
    h.i16(254, NIFTI_XFORM_SCANNER_ANAT);
    for (i, v) in [b, c, d, srow[0][3], srow[1][3], srow[2][3]]
        .into_iter()
        .enumerate()
    {
        h.f32(256 + 4 * i, v);
    }
    for (r, row) in srow.iter().enumerate() {
        for (i, &v) in row.iter().enumerate() {
            h.f32(280 + 16 * r + 4 * i, v);
        }
    }
    h.bytes[344..348].copy_from_slice(b"n+1\0");
    Ok(h.bytes)
}

struct HeaderWriter {
    bytes: Vec<u8>,
    big_endian: bool,
}

impl HeaderWriter {
    fn put<const N: usize>(&mut self, offset: usize, le: [u8; N], be: [u8; N]) {
        let v = if self.big_endian { be } else { le };
        self.bytes[offset..offset + N].copy_from_slice(&v);
    }

    fn i16(&mut self, offset: usize, v: i16) {
        self.put(offset, v.to_le_bytes(), v.to_be_bytes());
    }

    fn i32(&mut self, offset: usize, v: i32) {
        self.put(offset, v.to_le_bytes(), v.to_be_bytes());
    }

    fn f32(&mut self, offset: usize, v: f64) {
        let v = v as f32;
        self.put(offset, v.to_le_bytes(), v.to_be_bytes());
    }
}

fn determinant(m: [[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::path::PathBuf;

    fn reader_case(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/readers")
            .join(relative)
    }

    fn min_max(voxels: &[f32]) -> (f32, f32) {
        voxels
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            })
    }

    fn close(a: [f64; 3], b: [f64; 3], tolerance: f64) -> bool {
        (0..3).all(|i| (a[i] - b[i]).abs() <= tolerance)
    }

    const IDENTITY: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

    #[test]
    fn totalsegmentator_ct_and_labels() {
        let ct = read_image(&reader_case("nifti/totalseg_example_ct_sm.nii.gz")).unwrap();
        let g = &ct.geometry;
        assert_eq!(g.size, [122, 101, 30]);
        assert!(close(g.spacing, [3.0; 3], 1e-6));
        assert_eq!(g.direction, IDENTITY);
        // RAS diag(3, 3, 3): x and y reversed on the way to canonical LPS, so the first voxel
        // is the file's (121, 100, 0).
        let expected_origin = [177.956329 - 3.0 * 121.0, -11.319 - 3.0 * 100.0, 94.301758];
        assert!(close(g.origin, expected_origin, 1e-3), "{:?}", g.origin);
        assert_eq!(min_max(&ct.voxels), (-1100.0, 1207.0));

        let seg = read_labels(&reader_case("nifti/totalseg_example_seg.nii.gz")).unwrap();
        assert!(seg.geometry.same_grid(&ct.geometry));
        let mut present = [false; 256];
        for &v in &seg.voxels {
            present[usize::from(v)] = true;
        }
        // The data README calls 13..17 the lobes; in TotalSegmentator v2 the lobes are 10..14,
        // and this crop of the lung bases has 10, 11, 13 and 14 (no right upper lobe).
        for label in [0, 5, 10, 11, 13, 14] {
            assert!(present[label], "label {label} missing");
        }
        assert!(!present[12]);
        // Voxels keep their place: the labels sit on the same anatomy as before reorientation.
        let liver_hu: Vec<f32> = (0..seg.voxels.len())
            .filter(|&i| seg.voxels[i] == 5)
            .map(|i| ct.voxels[i])
            .collect();
        let mean = liver_hu.iter().sum::<f32>() / liver_hu.len() as f32;
        assert!((0.0..150.0).contains(&mean), "liver mean HU {mean}");
    }

    #[test]
    fn ct3slice_hu_and_liver_mask() {
        let ct = read_image(&reader_case("derived/ct3slice_hu.nii.gz")).unwrap();
        let g = &ct.geometry;
        assert_eq!(g.size, [512, 512, 3]);
        assert!(close(g.spacing, [0.810547, 0.810547, 1.0], 1e-5));
        assert_eq!(g.direction, IDENTITY);
        assert!(close(g.origin, [-235.2, -226.8, -128.69], 1e-3));
        assert_eq!(min_max(&ct.voxels), (-3024.0, 1381.0));

        let mask = read_labels(&reader_case("derived/ct3slice_liver_mask.nii.gz")).unwrap();
        assert!(mask.geometry.same_grid(&ct.geometry));
        for z in 0..3 {
            let plane = mask.plane(z);
            assert!(plane.iter().all(|&v| v <= 1));
            let fraction = plane.iter().filter(|&&v| v == 1).count() as f64 / plane.len() as f64;
            assert!((0.13..0.14).contains(&fraction), "slice {z}: {fraction}");
        }
    }

    /// A grid whose axes are permuted and reversed relative to canonical LPS.
    fn awkward_geometry() -> Geometry {
        Geometry {
            size: [5, 4, 3],
            spacing: [0.7, 1.25, 2.5],
            origin: [12.5, -30.25, 100.0],
            direction: [[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        }
    }

    fn awkward_image() -> Volume<i16> {
        let geometry = awkward_geometry();
        let voxels = (0..geometry.voxel_count())
            .map(|i| (i as i16 - 30) * 97)
            .collect();
        Volume::new(geometry, voxels).unwrap()
    }

    fn awkward_labels() -> Volume<u8> {
        let geometry = awkward_geometry();
        let voxels = (0..geometry.voxel_count()).map(|i| (i % 7) as u8).collect();
        Volume::new(geometry, voxels).unwrap()
    }

    #[test]
    fn round_trip_keeps_voxels_and_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let image = awkward_image();
        let labels = awkward_labels();
        let expected_image = image.clone().into_canonical();
        let expected_labels = labels.clone().into_canonical();
        assert!(!image.geometry.is_canonical());
        for name in ["a.nii", "b.nii.gz"] {
            let path = dir.path().join(name);
            write(&path, &image).unwrap();
            let back = read_image(&path).unwrap();
            assert!(
                back.geometry.same_grid(&expected_image.geometry),
                "{name}: {:?} vs {:?}",
                back.geometry,
                expected_image.geometry
            );
            let expected: Vec<f32> = expected_image.voxels.iter().map(|&v| v.into()).collect();
            assert_eq!(back.voxels, expected);

            let label_path = dir.path().join(format!("labels-{name}"));
            write(&label_path, &labels).unwrap();
            let back = read_labels(&label_path).unwrap();
            assert!(back.geometry.same_grid(&expected_labels.geometry));
            let expected: Vec<u16> = expected_labels.voxels.iter().map(|&v| v.into()).collect();
            assert_eq!(back.voxels, expected);
        }
        let gz = std::fs::read(dir.path().join("b.nii.gz")).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }

    #[test]
    fn qform_alone_gives_the_same_grid() {
        for geometry in [
            awkward_geometry(),
            // Left-handed: needs qfac = -1.
            Geometry {
                direction: [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
                ..awkward_geometry()
            },
            // Oblique: a few degrees about z.
            Geometry {
                direction: [
                    [0.996195, 0.087156, 0.0],
                    [-0.087156, 0.996195, 0.0],
                    [0.0, 0.0, 1.0],
                ],
                ..awkward_geometry()
            },
        ] {
            let volume = Volume::new(geometry.clone(), vec![1i16; geometry.voxel_count()]).unwrap();
            let mut bytes = encode_file(&volume, "Alveolus", false).unwrap();
            bytes[254..256].copy_from_slice(&0i16.to_le_bytes());
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("q.nii");
            std::fs::write(&path, &bytes).unwrap();
            let back = read_image(&path).unwrap();
            let expected = volume.into_canonical().geometry;
            assert!(
                back.geometry.same_grid(&expected),
                "{:?} vs {expected:?}",
                back.geometry
            );
        }
    }

    #[test]
    fn big_endian_files_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let image = awkward_image();
        let path = dir.path().join("be.nii");
        std::fs::write(&path, encode_file(&image, "Alveolus", true).unwrap()).unwrap();
        let back = read_image(&path).unwrap();
        let expected = image.into_canonical();
        assert!(back.geometry.same_grid(&expected.geometry));
        let expected: Vec<f32> = expected.voxels.iter().map(|&v| v.into()).collect();
        assert_eq!(back.voxels, expected);
    }

    /// Writes bytes to a fresh file and reads them both ways.
    struct Scratch {
        dir: tempfile::TempDir,
        count: usize,
    }

    impl Scratch {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
                count: 0,
            }
        }

        fn path(&mut self, bytes: &[u8]) -> PathBuf {
            self.count += 1;
            let path = self.dir.path().join(format!("{}.nii", self.count));
            std::fs::write(&path, bytes).unwrap();
            path
        }

        fn image_error(&mut self, bytes: &[u8]) -> String {
            let path = self.path(bytes);
            read_image(&path).unwrap_err().message
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn valid() -> Vec<u8> {
        encode_file(&awkward_image(), "Alveolus", false).unwrap()
    }

    fn patched(offset: usize, value: &[u8]) -> Vec<u8> {
        let mut bytes = valid();
        bytes[offset..offset + value.len()].copy_from_slice(value);
        bytes
    }

    fn assert_contains(message: &str, part: &str) {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }

    #[test]
    fn scaling_is_applied() {
        let mut s = Scratch::new();
        let mut bytes = patched(112, &2.0f32.to_le_bytes());
        bytes[116..120].copy_from_slice(&(-1024.0f32).to_le_bytes());
        let back = read_image(&s.path(&bytes)).unwrap();
        let expected: Vec<f32> = awkward_image()
            .into_canonical()
            .voxels
            .iter()
            .map(|&v| f32::from(v) * 2.0 - 1024.0)
            .collect();
        assert_eq!(back.voxels, expected);

        // Labels scaled to fractions are not labels.
        let mut labels = encode_file(&awkward_labels(), "Alveolus", false).unwrap();
        labels[112..116].copy_from_slice(&0.5f32.to_le_bytes());
        let err = read_labels(&s.path(&labels)).unwrap_err().message;
        assert_contains(&err, "holds 0.5, which is not a label");
        // Negative values are not labels either.
        let err = read_labels(&s.path(&valid())).unwrap_err().message;
        assert_contains(&err, "voxel (0, 0, 0) of the file holds -2910");
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let mut s = Scratch::new();
        let good = valid();

        assert_contains(
            &s.image_error(&good[..200]),
            "shorter than a NIfTI-1 header",
        );
        assert_contains(&s.image_error(&good[..good.len() - 1]), "truncated");
        assert_contains(&s.image_error(&gzip(&good[..good.len() - 3])), "truncated");
        let compressed = gzip(&good);
        let cut = s.image_error(&compressed[..compressed.len() / 2]);
        assert!(
            cut.contains("corrupt") || cut.contains("truncated"),
            "{cut}"
        );
        assert_contains(&s.image_error(b""), "0 bytes");

        assert_contains(
            &s.image_error(&patched(344, b"xyz\0")),
            "magic \"xyz\\x00\"",
        );
        assert_contains(&s.image_error(&patched(344, b"ni1\0")), ".hdr/.img pair");
        assert_contains(
            &s.image_error(&patched(0, &540i32.to_le_bytes())),
            "NIfTI-2",
        );
        assert_contains(
            &s.image_error(&patched(0, &1234i32.to_le_bytes())),
            "is 1234",
        );

        // A header that claims a huge volume must not make the reader allocate it.
        let mut lying = patched(42, &32767i16.to_le_bytes());
        lying[44..46].copy_from_slice(&32767i16.to_le_bytes());
        lying[46..48].copy_from_slice(&32767i16.to_le_bytes());
        lying[70..72].copy_from_slice(&64i16.to_le_bytes());
        assert_contains(&s.image_error(&lying), "32767x32767x32767 float64");
        assert_contains(&s.image_error(&gzip(&lying)), "truncated");
        assert_contains(
            &s.image_error(&patched(44, &0i16.to_le_bytes())),
            "dim[2] = 0",
        );

        assert_contains(
            &s.image_error(&patched(70, &32i16.to_le_bytes())),
            "32 (complex64)",
        );
        assert_contains(
            &s.image_error(&patched(70, &7i16.to_le_bytes())),
            "datatype 7",
        );

        let mut series = patched(40, &4i16.to_le_bytes());
        series[48..50].copy_from_slice(&5i16.to_le_bytes());
        assert_contains(&s.image_error(&series), "holds 5 volumes");
        // A 4-D header with one volume is a 3-D volume.
        read_image(&s.path(&patched(40, &4i16.to_le_bytes()))).unwrap();
        assert_contains(
            &s.image_error(&patched(40, &2i16.to_le_bytes())),
            "2-D image",
        );

        assert_contains(
            &s.image_error(&patched(288, &f32::NAN.to_le_bytes())),
            "non-finite",
        );
        assert_contains(&s.image_error(&patched(280, &[0; 48])), "no length");
        assert_contains(
            &s.image_error(&patched(108, &100.0f32.to_le_bytes())),
            "vox_offset",
        );

        // With no sform the qform decides, and a NaN there is an error too.
        let mut qform = patched(254, &0i16.to_le_bytes());
        qform[268..272].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_contains(&s.image_error(&qform), "qform");
    }

    #[test]
    fn damaged_files_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut s = Scratch::new();
        let sources = [
            valid(),
            encode_file(&awkward_labels(), "Alveolus", true).unwrap(),
        ];
        let mut refused = 0;
        for i in 0..400 {
            let mut bytes = sources[i % 2].clone();
            for _ in 0..rng.random_range(1..6) {
                // Mostly the header, where a changed byte changes what the reader believes.
                let at = if rng.random_bool(0.8) {
                    rng.random_range(0..352)
                } else {
                    rng.random_range(0..bytes.len())
                };
                bytes[at] = rng.random();
            }
            if rng.random_bool(0.3) {
                bytes.truncate(rng.random_range(0..bytes.len()));
            }
            if rng.random_bool(0.4) {
                bytes = gzip(&bytes);
                if rng.random_bool(0.3) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            let path = s.path(&bytes);
            let image = read_image(&path);
            let labels = read_labels(&path);
            refused += usize::from(image.is_err()) + usize::from(labels.is_err());
            if let Ok(volume) = image {
                assert_eq!(volume.voxels.len(), volume.geometry.voxel_count());
            }
        }
        // Most damage is noticed; some lands in ignored header fields or in voxel values.
        assert!(refused > 400, "{refused}");
    }
}
