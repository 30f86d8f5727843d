//! JPEG-LS (ITU-T T.87 | ISO/IEC 14495-1) decoding of single-component images, the form CT
//! scanners and archives write for the JPEG-LS transfer syntaxes (1.2.840.10008.1.2.4.80 and
//! .81).
//!
//! It exists so that the project reads JPEG-LS pixel data without CharLS: CharLS is C++ and
//! needs cmake and a C++ compiler to build, and the project builds with only a Rust toolchain.
//!
//! Covered: lossless and near-lossless coding, sample precision 2 to 16 bits, default and
//! LSE-given coding parameters (T1, T2, T3, RESET, MAXVAL), restart intervals, and the whole of
//! Annex A (context modelling, bias correction, run mode). Refused with an error: more than one
//! component, mapping tables (LSE id 2 and 3), oversize dimensions (LSE id 4), point transform,
//! and a height given only by a DNL marker. None of those occur in CT.
//!
//! Streams that CharLS 1.x (the copy in DCMTK 3.6.7, for one) wrote for samples of 7 bits or
//! fewer without an LSE segment used default thresholds other than T.87's; like CharLS 2, this
//! decoder follows the standard, so those (rare, never CT) streams fail to decode.
//!
//! The input is untrusted: every failure is an `Err`, never a panic, and memory is bounded by
//! `MAX_SAMPLES` and grows with the data actually decoded, not with what a header claims.

mod scan;

use self::scan::decode_scan;

/// Image sizes above this are refused: 2^28 samples (512 MiB of output) is far above any CT
/// slice and keeps a forged header from asking for gigabytes.
const MAX_SAMPLES: usize = 1 << 28;

/// The order of the run-length code (T.87 A.7.1.1, table A.1): run segments grow as a run of
/// the same value keeps going.
const J: [u32; 32] = [
    0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13,
    14, 15,
];

/// 365 regular contexts (T.87 A.3.4) and the two run interruption contexts after them.
const REGULAR_CONTEXTS: usize = 365;

/// Bias correction bounds (T.87 A.6.2, MIN_C and MAX_C).
const MIN_C: i32 = -128;
const MAX_C: i32 = 127;

/// A decoded image: one component, `height` rows of `width` samples, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub bits_per_sample: u8,
    pub samples: Vec<u16>,
}

/// Decodes one JPEG-LS codestream (SOI..EOI) of a single-component image.
pub fn decode(data: &[u8]) -> Result<Image, String> {
    if data.get(..2) != Some(&[0xFF, 0xD8][..]) {
        return Err("JPEG-LS: the data does not start with an SOI marker (0xFFD8)".into());
    }
    let mut pos = 2;
    let mut frame: Option<Frame> = None;
    let mut preset = Preset::default();
    let mut restart_interval = 0usize;
    let mut image: Option<Image> = None;
    loop {
        let (marker, at) = next_marker(data, pos)?;
        match marker {
            0xD9 => {
                return image.ok_or_else(|| {
                    format!("JPEG-LS: EOI at byte {at} comes before any scan (no image data)")
                });
            }
            0xF7 => {
                let body = segment(data, at)?;
                if frame.is_some() {
                    return Err(format!("JPEG-LS: second frame header (SOF55) at byte {at}"));
                }
                frame = Some(Frame::parse(body, at)?);
                pos = at + 2 + body.len() + 2;
            }
            0xF8 => {
                let body = segment(data, at)?;
                preset.parse(body, at)?;
                pos = at + 2 + body.len() + 2;
            }
            0xDD => {
                let body = segment(data, at)?;
                restart_interval = match body.len() {
                    2..=4 => body.iter().fold(0usize, |v, &b| (v << 8) | usize::from(b)),
                    n => {
                        return Err(format!(
                            "JPEG-LS: DRI segment at byte {at} has {n} value bytes (2 to 4 allowed)"
                        ));
                    }
                };
                pos = at + 2 + body.len() + 2;
            }
            0xDA => {
                let body = segment(data, at)?;
                let Some(frame) = frame.as_ref() else {
                    return Err(format!("JPEG-LS: scan (SOS) at byte {at} before any SOF55"));
                };
                if image.is_some() {
                    return Err(format!(
                        "JPEG-LS: second scan at byte {at}; a single-component image has one"
                    ));
                }
                let near = parse_scan_header(body, frame, at)?;
                let params = Params::new(frame.precision, near, &preset)?;
                let scan_start = at + 2 + body.len() + 2;
                let (samples, end) =
                    decode_scan(data, scan_start, frame, &params, restart_interval)?;
                image = Some(Image {
                    width: frame.width,
                    height: frame.height,
                    bits_per_sample: frame.precision,
                    samples,
                });
                pos = end;
            }
            0xE0..=0xEF | 0xFE => {
                let body = segment(data, at)?;
                pos = at + 2 + body.len() + 2;
            }
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(format!(
                    "JPEG-LS: marker 0xFF{marker:02X} at byte {at} starts a JPEG (T.81) frame, \
                     not JPEG-LS"
                ));
            }
            0xD0..=0xD7 => {
                return Err(format!(
                    "JPEG-LS: restart marker 0xFF{marker:02X} at byte {at} outside a scan"
                ));
            }
            0xDC => {
                return Err(format!(
                    "JPEG-LS: marker 0xFFDC (DNL) at byte {at} is not supported"
                ));
            }
            _ => {
                return Err(format!(
                    "JPEG-LS: marker 0xFF{marker:02X} at byte {at} is not supported"
                ));
            }
        }
    }
}

/// Finds the marker at `pos`, past any 0xFF fill bytes (T.81 B.1.1.2 allows them before a
/// marker); returns its code and the offset of its last 0xFF.
fn next_marker(data: &[u8], mut pos: usize) -> Result<(u8, usize), String> {
    match data.get(pos) {
        Some(0xFF) => {}
        Some(b) => {
            return Err(format!(
                "JPEG-LS: expected a marker at byte {pos}, found byte 0x{b:02X}"
            ));
        }
        None => {
            return Err(format!(
                "JPEG-LS: the data ends at byte {pos} without an EOI marker"
            ));
        }
    }
    while data.get(pos + 1) == Some(&0xFF) {
        pos += 1;
    }
    match data.get(pos + 1) {
        Some(&code) => Ok((code, pos)),
        None => Err(format!(
            "JPEG-LS: the data ends at byte {} inside a marker",
            pos + 1
        )),
    }
}

/// The body of the marker segment whose marker is at `at` (without the length field).
fn segment(data: &[u8], at: usize) -> Result<&[u8], String> {
    let len_at = at + 2;
    let Some(len) = data.get(len_at..len_at + 2) else {
        return Err(format!(
            "JPEG-LS: the data ends inside the length of the segment at byte {at}"
        ));
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len < 2 {
        return Err(format!(
            "JPEG-LS: segment at byte {at} has length {len} (at least 2)"
        ));
    }
    data.get(len_at + 2..len_at + len).ok_or_else(|| {
        format!(
            "JPEG-LS: segment 0xFF{:02X} at byte {at} is {len} bytes long, past the end of \
             the data ({} bytes)",
            data[at + 1],
            data.len()
        )
    })
}

fn be16(b: &[u8], i: usize) -> usize {
    usize::from(b[i]) << 8 | usize::from(b[i + 1])
}

/// The frame header (SOF55).
#[derive(Debug)]
struct Frame {
    precision: u8,
    width: usize,
    height: usize,
    component_id: u8,
}

impl Frame {
    fn parse(body: &[u8], at: usize) -> Result<Frame, String> {
        if body.len() < 6 {
            return Err(format!("JPEG-LS: SOF55 segment at byte {at} is too short"));
        }
        let precision = body[0];
        let height = be16(body, 1);
        let width = be16(body, 3);
        let components = usize::from(body[5]);
        if !(2..=16).contains(&precision) {
            return Err(format!(
                "JPEG-LS: sample precision {precision} at byte {} (2 to 16 allowed)",
                at + 4
            ));
        }
        if components != 1 {
            return Err(format!(
                "JPEG-LS: {components} components in the frame at byte {at}; only \
                 single-component (grayscale) images are supported"
            ));
        }
        if body.len() != 6 + 3 * components {
            return Err(format!(
                "JPEG-LS: SOF55 segment at byte {at} has {} bytes, {} expected",
                body.len(),
                6 + 3 * components
            ));
        }
        if height == 0 {
            return Err(format!(
                "JPEG-LS: frame at byte {at} leaves the height to a DNL marker, which is not \
                 supported"
            ));
        }
        if width == 0 {
            return Err(format!(
                "JPEG-LS: frame at byte {at} has width 0 (widths above 65535 need LSE id 4, \
                 which is not supported)"
            ));
        }
        // 65535 x 65535 fits even a 32-bit usize; checked all the same, as cheap insurance.
        match width.checked_mul(height) {
            Some(n) if n <= MAX_SAMPLES => {}
            _ => {
                return Err(format!(
                    "JPEG-LS: frame at byte {at} is {width}x{height}, above the limit of \
                     {MAX_SAMPLES} samples"
                ));
            }
        }
        Ok(Frame {
            precision,
            width,
            height,
            component_id: body[6],
        })
    }
}

/// Returns NEAR after checking that the scan codes the frame's one component without mapping
/// table or point transform.
fn parse_scan_header(body: &[u8], frame: &Frame, at: usize) -> Result<u8, String> {
    let Some(&ns) = body.first() else {
        return Err(format!("JPEG-LS: SOS segment at byte {at} is empty"));
    };
    if ns != 1 {
        return Err(format!(
            "JPEG-LS: scan at byte {at} has {ns} components; only one is supported"
        ));
    }
    if body.len() != 1 + 2 * usize::from(ns) + 3 {
        return Err(format!(
            "JPEG-LS: SOS segment at byte {at} has {} bytes, 6 expected",
            body.len()
        ));
    }
    let (component, table, near, ilv, transform) = (body[1], body[2], body[3], body[4], body[5]);
    if component != frame.component_id {
        return Err(format!(
            "JPEG-LS: scan at byte {at} codes component {component}, the frame has only {}",
            frame.component_id
        ));
    }
    if table != 0 {
        return Err(format!(
            "JPEG-LS: scan at byte {at} uses mapping table {table}; mapping tables are not \
             supported"
        ));
    }
    // One component codes the same whatever the interleave mode says, so 1 and 2 (which some
    // encoders write for grayscale) are accepted as well as the conforming 0.
    if ilv > 2 {
        return Err(format!(
            "JPEG-LS: scan at byte {at} has interleave mode {ilv} (0 to 2 allowed)"
        ));
    }
    if transform != 0 {
        return Err(format!(
            "JPEG-LS: scan at byte {at} uses point transform {}; point transform is not \
             supported",
            transform & 0x0F
        ));
    }
    Ok(near)
}

/// Coding parameters from an LSE id 1 segment; zero means "the default" (T.87 C.2.4.1.1).
#[derive(Debug, Default)]
struct Preset {
    maxval: usize,
    t1: usize,
    t2: usize,
    t3: usize,
    reset: usize,
}

impl Preset {
    fn parse(&mut self, body: &[u8], at: usize) -> Result<(), String> {
        match body.first() {
            Some(1) if body.len() == 11 => {
                *self = Preset {
                    maxval: be16(body, 1),
                    t1: be16(body, 3),
                    t2: be16(body, 5),
                    t3: be16(body, 7),
                    reset: be16(body, 9),
                };
                Ok(())
            }
            Some(1) => Err(format!(
                "JPEG-LS: LSE coding parameters segment at byte {at} has {} bytes, 11 expected",
                body.len()
            )),
            Some(2 | 3) => Err(format!(
                "JPEG-LS: LSE segment at byte {at} holds a mapping table; mapping tables are not \
                 supported"
            )),
            Some(4) => Err(format!(
                "JPEG-LS: LSE segment at byte {at} gives oversize dimensions (id 4), which are \
                 not supported"
            )),
            Some(id) => Err(format!(
                "JPEG-LS: LSE segment at byte {at} has unknown id {id}"
            )),
            None => Err(format!("JPEG-LS: LSE segment at byte {at} is empty")),
        }
    }
}

/// Everything the scan decoder needs that follows from the headers (T.87 A.2.1 and C.2.4.1.1).
#[derive(Debug)]
struct Params {
    maxval: i32,
    near: i32,
    range: i32,
    qbpp: u32,
    limit: u32,
    t1: i32,
    t2: i32,
    t3: i32,
    reset: i32,
}

impl Params {
    fn new(precision: u8, near: u8, preset: &Preset) -> Result<Params, String> {
        let full = (1usize << precision) - 1;
        let maxval = match preset.maxval {
            0 => full,
            m if m <= full => m,
            m => {
                return Err(format!(
                    "JPEG-LS: LSE MAXVAL {m} exceeds {full}, the largest {precision}-bit value"
                ));
            }
        };
        let near = usize::from(near);
        if near > (maxval / 2).min(255) {
            return Err(format!(
                "JPEG-LS: NEAR {near} is too large for MAXVAL {maxval} (at most {})",
                (maxval / 2).min(255)
            ));
        }
        let (d1, d2, d3) = default_thresholds(maxval, near);
        let t1 = if preset.t1 == 0 { d1 } else { preset.t1 };
        let t2 = if preset.t2 == 0 { d2 } else { preset.t2 };
        let t3 = if preset.t3 == 0 { d3 } else { preset.t3 };
        let reset = if preset.reset == 0 { 64 } else { preset.reset };
        // Only the values the LSE segment gives are checked, as T.87 C.2.4.1.1 and CharLS do;
        // a default can end up below a given lower threshold, and decoding then follows the
        // region definitions of A.3.3 as written.
        if (preset.t1 != 0 && (t1 < near + 1 || t1 > maxval))
            || (preset.t2 != 0 && (t2 < t1 || t2 > maxval))
            || (preset.t3 != 0 && (t3 < t2 || t3 > maxval))
        {
            return Err(format!(
                "JPEG-LS: LSE thresholds T1={t1} T2={t2} T3={t3} are invalid for NEAR {near} and \
                 MAXVAL {maxval} (NEAR+1 <= T1 <= T2 <= T3 <= MAXVAL)"
            ));
        }
        if !(3..=maxval.max(255)).contains(&reset) {
            return Err(format!(
                "JPEG-LS: RESET {reset} is invalid for MAXVAL {maxval} (3 to {})",
                maxval.max(255)
            ));
        }
        let range = (maxval + 2 * near) / (2 * near + 1) + 1;
        let bpp = ceil_log2(maxval + 1).max(2);
        let i = |v: usize| v as i32; // every value here is at most 65535 + 2 * 255 + 1
        Ok(Params {
            maxval: i(maxval),
            near: i(near),
            range: i(range),
            qbpp: ceil_log2(range),
            limit: 2 * (bpp + bpp.max(8)),
            t1: i(t1),
            t2: i(t2),
            t3: i(t3),
            reset: i(reset),
        })
    }
}

/// The smallest n with 2^n >= v.
fn ceil_log2(v: usize) -> u32 {
    v.next_power_of_two().trailing_zeros()
}

/// Default T1, T2, T3 for MAXVAL and NEAR (T.87 C.2.4.1.1.1), scaled from the thresholds
/// for 8-bit lossless coding (BASIC_T1..3 of table C.3).
fn default_thresholds(maxval: usize, near: usize) -> (usize, usize, usize) {
    const BASIC: [usize; 3] = [3, 7, 21];
    let clamp = |v: usize, lo: usize| if v > maxval || v < lo { lo } else { v };
    if maxval >= 128 {
        let factor = (maxval.min(4095) + 128) / 256;
        let t1 = clamp(factor * (BASIC[0] - 2) + 2 + 3 * near, near + 1);
        let t2 = clamp(factor * (BASIC[1] - 3) + 3 + 5 * near, t1);
        let t3 = clamp(factor * (BASIC[2] - 4) + 4 + 7 * near, t2);
        (t1, t2, t3)
    } else {
        let factor = 256 / (maxval + 1);
        let t1 = clamp((BASIC[0] / factor + 3 * near).max(2), near + 1);
        let t2 = clamp((BASIC[1] / factor + 5 * near).max(3), t1);
        let t3 = clamp((BASIC[2] / factor + 7 * near).max(4), t2);
        (t1, t2, t3)
    }
}

#[cfg(test)]
mod tests;
