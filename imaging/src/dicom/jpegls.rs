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

/// Why the entropy-coded data could not be decoded; turned into a message with the byte
/// offset by the caller, which knows where the reader stopped.
enum Fault {
    /// More bits were needed than the segment before the next marker holds.
    End,
    /// A code that no conforming encoder writes.
    Invalid(&'static str),
}

/// Reads the entropy-coded data of a scan, MSB first. A 0xFF data byte is followed by a byte
/// whose top bit is a stuffed 0 (T.87 A.1), so that byte gives 7 bits; a 0xFF followed by a
/// byte with the top bit set is a marker and ends the data.
struct BitReader<'a> {
    data: &'a [u8],
    /// The next byte to load into `cache`.
    pos: usize,
    /// Unread bits, left-aligned; the bits below the top `bits` are zero.
    cache: u64,
    bits: u32,
    /// The byte at `pos` follows a 0xFF data byte.
    stuffed: bool,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            cache: 0,
            bits: 0,
            stuffed: false,
        }
    }

    fn refill(&mut self) {
        while self.bits <= 56 {
            let Some(&byte) = self.data.get(self.pos) else {
                return;
            };
            if self.stuffed {
                // A byte with its top bit set here was seen as a marker before 0xFF was taken.
                self.cache |= u64::from(byte & 0x7F) << (57 - self.bits);
                self.bits += 7;
                self.stuffed = false;
            } else {
                if byte == 0xFF {
                    match self.data.get(self.pos + 1) {
                        Some(&next) if next < 0x80 => self.stuffed = true,
                        _ => return,
                    }
                }
                self.cache |= u64::from(byte) << (56 - self.bits);
                self.bits += 8;
            }
            self.pos += 1;
        }
    }

    /// Reads `n` bits, `n` at most 32.
    #[inline]
    fn bits(&mut self, n: u32) -> Result<u32, Fault> {
        if n == 0 {
            return Ok(0);
        }
        if self.bits < n {
            self.refill();
            if self.bits < n {
                return Err(Fault::End);
            }
        }
        let v = (self.cache >> (64 - n)) as u32;
        self.cache <<= n;
        self.bits -= n;
        Ok(v)
    }

    /// Counts 0 bits up to and including the next 1 bit; more than `max` zeros is an error.
    #[inline]
    fn zeros(&mut self, max: u32) -> Result<u32, Fault> {
        let mut count = 0;
        loop {
            if self.bits == 0 {
                self.refill();
                if self.bits == 0 {
                    return Err(Fault::End);
                }
            }
            let lz = self.cache.leading_zeros();
            if lz < self.bits {
                count += lz;
                // lz + 1 may be 64, which a single shift does not allow.
                self.cache = (self.cache << lz) << 1;
                self.bits -= lz + 1;
                return if count > max {
                    Err(Fault::Invalid("a Golomb code's unary prefix is too long"))
                } else {
                    Ok(count)
                };
            }
            count += self.bits;
            self.cache = 0;
            self.bits = 0;
            if count > max {
                return Err(Fault::Invalid("a Golomb code's unary prefix is too long"));
            }
        }
    }

    /// Decodes a length-limited Golomb code of order `k` (T.87 A.5.3), `limit` being LIMIT
    /// (regular mode) or LIMIT - J[RUNindex] - 1 (run interruption).
    #[inline]
    fn golomb(&mut self, k: u32, limit: u32, qbpp: u32) -> Result<u32, Fault> {
        let escape = limit.saturating_sub(qbpp + 1);
        if self.bits < 32 {
            self.refill();
        }
        let lz = self.cache.leading_zeros();
        let value = if lz < escape && lz + 1 + k <= self.bits {
            // The whole code is in the cache, as it nearly always is: one step, no refills.
            let after_prefix = self.cache << lz << 1;
            self.cache = after_prefix << k;
            self.bits -= lz + 1 + k;
            let low = if k == 0 { 0 } else { after_prefix >> (64 - k) };
            (u64::from(lz) << k) | low
        } else {
            let prefix = self.zeros(escape)?;
            if prefix < escape {
                (u64::from(prefix) << k) | u64::from(self.bits(k)?)
            } else {
                u64::from(self.bits(qbpp)?) + 1
            }
        };
        // A mapped error of a conforming stream is at most about RANGE <= 2^qbpp; bounding it
        // keeps the context sums below overflow whatever the data says.
        if value > 1 << (qbpp + 2) {
            return Err(Fault::Invalid("a mapped prediction error is out of range"));
        }
        Ok(value as u32)
    }

    /// Offset of the first byte not wholly consumed (for messages).
    fn offset(&self) -> usize {
        self.pos.saturating_sub((self.bits / 8) as usize)
    }

    /// Where the marker after a scan or restart interval starts. The bits still cached are the
    /// zero padding of the last byte (and bytes before the marker, which a conforming stream
    /// does not have), so the search starts at the first byte not yet loaded.
    fn marker_offset(&self) -> Option<usize> {
        let mut p = self.pos;
        while p + 1 < self.data.len() {
            if self.data[p] == 0xFF && self.data[p + 1] >= 0x80 {
                return Some(p);
            }
            p += 1;
        }
        None
    }
}

/// Context statistics (T.87 A.2.1): the regular contexts, then the two run interruption
/// contexts at 365 (RItype 0) and 366 (RItype 1).
struct Contexts {
    /// Sums of error magnitudes; i64 because RESET may be up to 65535 and errors up to 2^17.
    a: [i64; REGULAR_CONTEXTS + 2],
    b: [i32; REGULAR_CONTEXTS],
    c: [i32; REGULAR_CONTEXTS],
    n: [i32; REGULAR_CONTEXTS + 2],
    nn: [i32; 2],
    run_index: usize,
}

impl Contexts {
    fn new(p: &Params) -> Self {
        let a = i64::from(2.max((p.range + 32) / 64));
        Contexts {
            a: [a; REGULAR_CONTEXTS + 2],
            b: [0; REGULAR_CONTEXTS],
            c: [0; REGULAR_CONTEXTS],
            n: [1; REGULAR_CONTEXTS + 2],
            nn: [0; 2],
            run_index: 0,
        }
    }
}

/// Golomb order k: the smallest with N << k >= A (T.87 A.5.1). From the bit lengths of A and N
/// it is one of two values, which saves the 16-step loop that 16-bit data would need. Capped at
/// 32 because the reader reads at most 32 bits; a conforming stream never needs more than 18.
#[inline]
fn golomb_k(n: i32, a: i64) -> u32 {
    let n = i64::from(n.max(1));
    if n >= a {
        return 0;
    }
    let mut k = a.ilog2() - n.ilog2();
    if (n << k) < a {
        k += 1;
    }
    k.min(32)
}

/// Undoes prediction and error quantisation: modular reduction into range and the clamp to
/// 0..=MAXVAL (T.87 A.4.5 and C.2.2).
#[inline]
fn reconstruct(p: &Params, predicted: i32, error: i32) -> i32 {
    let mut rx = predicted + error * (2 * p.near + 1);
    if rx < -p.near {
        rx += p.range * (2 * p.near + 1);
    } else if rx > p.maxval + p.near {
        rx -= p.range * (2 * p.near + 1);
    }
    rx.clamp(0, p.maxval)
}

/// Decodes the scan whose entropy-coded data starts at `start`; returns the samples and the
/// offset of the marker after the scan.
fn decode_scan(
    data: &[u8],
    start: usize,
    frame: &Frame,
    p: &Params,
    restart_interval: usize,
) -> Result<(Vec<u16>, usize), String> {
    let (width, height) = (frame.width, frame.height);
    // Gradient quantisation (T.87 A.3.3) as a table over every difference of two samples.
    let maxval = p.maxval as usize;
    let quant = gradient_table(p);
    // The output grows line by line, so a header that promises more than the data holds costs
    // no more memory than the data it comes with.
    let total = width * height;
    let mut samples: Vec<u16> = Vec::with_capacity(total.min(data.len().saturating_mul(8)));
    // Lines with one extra sample at each end for the edge rules of T.87 A.2.1: index 0 is the
    // sample left of the first, index width + 1 the one right of the last.
    let mut prev = vec![0i32; width + 2];
    let mut cur = vec![0i32; width + 2];
    let mut ctx = Contexts::new(p);
    let mut reader = BitReader::new(data, start);
    let interval = if restart_interval == 0 {
        height
    } else {
        restart_interval
    };
    let mut expected_rst = 0u8;
    for y in 0..height {
        if y > 0 && y % interval == 0 {
            let Some(at) = reader.marker_offset() else {
                return Err(format!(
                    "JPEG-LS: the data ends before the restart marker expected after line {y}"
                ));
            };
            let (code, at) = next_marker(data, at)?;
            if code != 0xD0 + expected_rst {
                return Err(format!(
                    "JPEG-LS: expected restart marker 0xFF{:02X} at byte {at}, found 0xFF{code:02X}",
                    0xD0 + expected_rst
                ));
            }
            expected_rst = (expected_rst + 1) % 8;
            // Each restart interval is coded as if it began the image: fresh contexts and run
            // index, and zeros for the line above its first line.
            reader = BitReader::new(data, at + 2);
            ctx = Contexts::new(p);
            prev.fill(0);
            cur.fill(0);
        }
        cur[0] = prev[1];
        prev[width + 1] = prev[width];
        decode_line(&mut reader, p, &quant, maxval, &mut ctx, &prev, &mut cur).map_err(
            |fault| match fault {
                Fault::End => format!(
                    "JPEG-LS: the entropy-coded data ends early, at byte {} (line {y} of \
                     {height})",
                    reader.offset()
                ),
                Fault::Invalid(why) => format!(
                    "JPEG-LS: invalid entropy-coded data near byte {} (line {y}): {why}",
                    reader.offset()
                ),
            },
        )?;
        samples.extend(cur[1..=width].iter().map(|&v| v as u16));
        std::mem::swap(&mut prev, &mut cur);
    }
    let end = reader.marker_offset().ok_or_else(|| {
        format!(
            "JPEG-LS: no marker after the scan's data (from byte {})",
            reader.offset()
        )
    })?;
    Ok((samples, end))
}

/// Region numbers of every difference -MAXVAL..=MAXVAL (T.87 A.3.3), indexed by
/// difference + MAXVAL. Only differences smaller than the largest threshold need comparing;
/// beyond it every difference is in an outer region, and for 16-bit data that is nearly all of
/// the 131071 entries.
fn gradient_table(p: &Params) -> Vec<i8> {
    let m = p.maxval;
    let span = p.t1.max(p.t2).max(p.t3).max(p.near + 1).min(m);
    let mut table = vec![-4i8; (m - span) as usize];
    table.extend((-span..=span).map(|d| quantize_gradient(d, p)));
    table.resize(2 * m as usize + 1, 4);
    table
}

fn quantize_gradient(d: i32, p: &Params) -> i8 {
    if d <= -p.t3 {
        -4
    } else if d <= -p.t2 {
        -3
    } else if d <= -p.t1 {
        -2
    } else if d < -p.near {
        -1
    } else if d <= p.near {
        0
    } else if d < p.t1 {
        1
    } else if d < p.t2 {
        2
    } else if d < p.t3 {
        3
    } else {
        4
    }
}

/// Decodes one line into `cur[1..=width]`; `cur[0]` and `prev` already hold the neighbours.
/// Every sample written is in 0..=MAXVAL, which keeps the gradient table's index in bounds.
fn decode_line(
    r: &mut BitReader,
    p: &Params,
    quant: &[i8],
    maxval: usize,
    ctx: &mut Contexts,
    prev: &[i32],
    cur: &mut [i32],
) -> Result<(), Fault> {
    let width = cur.len() - 2;
    let prev = &prev[..width + 2];
    let q = |d: i32| i32::from(quant[(d + maxval as i32) as usize]);
    let mut x = 1;
    while x <= width {
        let ra = cur[x - 1];
        let [rc, rb, rd] = [prev[x - 1], prev[x], prev[x + 1]];
        let (q1, q2, q3) = (q(rd - rb), q(rb - rc), q(rc - ra));
        if q1 == 0 && q2 == 0 && q3 == 0 {
            x = decode_run(r, p, ctx, prev, cur, x)?;
            continue;
        }
        // Regular mode (T.87 A.3 to A.6).
        let mut qi = (q1 * 9 + q2) * 9 + q3;
        let sign = if qi < 0 { -1 } else { 1 };
        qi *= sign;
        let qi = qi as usize;
        let mut px = if rc >= ra.max(rb) {
            ra.min(rb)
        } else if rc <= ra.min(rb) {
            ra.max(rb)
        } else {
            ra + rb - rc
        };
        px = (px + sign * ctx.c[qi]).clamp(0, p.maxval);
        let k = golomb_k(ctx.n[qi], ctx.a[qi]);
        let mapped = r.golomb(k, p.limit, p.qbpp)? as i32;
        let mut err = if mapped & 1 == 0 {
            mapped >> 1
        } else {
            -((mapped + 1) >> 1)
        };
        // The encoder swaps the mapping of positive and negative errors in contexts whose bias
        // is negative (T.87 A.5.2).
        if p.near == 0 && k == 0 && 2 * ctx.b[qi] <= -ctx.n[qi] {
            err = -err - 1;
        }
        update_regular(ctx, qi, err, p);
        cur[x] = reconstruct(p, px, sign * err);
        x += 1;
    }
    Ok(())
}

/// Context update and bias correction (T.87 A.6.1 and A.6.2).
#[inline]
fn update_regular(ctx: &mut Contexts, q: usize, err: i32, p: &Params) {
    let mut b = ctx.b[q] + err * (2 * p.near + 1);
    let mut a = ctx.a[q] + i64::from(err.abs());
    let mut n = ctx.n[q];
    if n == p.reset {
        a >>= 1;
        b >>= 1;
        n >>= 1;
    }
    n += 1;
    if b <= -n {
        b += n;
        if ctx.c[q] > MIN_C {
            ctx.c[q] -= 1;
        }
        if b <= -n {
            b = -n + 1;
        }
    } else if b > 0 {
        b -= n;
        if ctx.c[q] < MAX_C {
            ctx.c[q] += 1;
        }
        if b > 0 {
            b = 0;
        }
    }
    ctx.a[q] = a;
    ctx.b[q] = b;
    ctx.n[q] = n;
}

/// Run mode from sample `x` (T.87 A.7): a run of Ra, then, unless the run reaches the end of
/// the line, a run interruption sample. Returns the next sample to decode.
fn decode_run(
    r: &mut BitReader,
    p: &Params,
    ctx: &mut Contexts,
    prev: &[i32],
    cur: &mut [i32],
    x: usize,
) -> Result<usize, Fault> {
    let width = cur.len() - 2;
    let ra = cur[x - 1];
    let remaining = width + 1 - x;
    let mut run = 0;
    let mut ended = false;
    while r.bits(1)? == 1 {
        let segment = 1usize << J[ctx.run_index];
        let count = segment.min(remaining - run);
        run += count;
        if count == segment && ctx.run_index < 31 {
            ctx.run_index += 1;
        }
        if run == remaining {
            ended = true;
            break;
        }
    }
    if !ended {
        run += r.bits(J[ctx.run_index])? as usize;
        if run >= remaining {
            return Err(Fault::Invalid("a run is longer than the rest of its line"));
        }
    }
    cur[x..x + run].fill(ra);
    let x = x + run;
    if ended {
        return Ok(x);
    }
    // Run interruption sample (T.87 A.7.2).
    let rb = prev[x];
    let ri_type = usize::from((ra - rb).abs() <= p.near);
    let q = REGULAR_CONTEXTS + ri_type;
    let temp = if ri_type == 1 {
        ctx.a[q] + i64::from(ctx.n[q] >> 1)
    } else {
        ctx.a[q]
    };
    let k = golomb_k(ctx.n[q], temp);
    let limit = p.limit - J[ctx.run_index] - 1;
    let mapped = r.golomb(k, limit, p.qbpp)? as i32;
    // Inverse of the EMErrval mapping (T.87 A.7.2.2): the parity of EMErrval + RItype is the
    // encoder's `map` bit, which together with k and Nn/N tells the sign of the error.
    let t = mapped + ri_type as i32;
    let map = t & 1;
    let magnitude = (t + map) >> 1;
    let negative_maps_odd = k != 0 || 2 * ctx.nn[ri_type] >= ctx.n[q];
    let err = if negative_maps_odd == (map == 1) {
        -magnitude
    } else {
        magnitude
    };
    if err < 0 {
        ctx.nn[ri_type] += 1;
    }
    ctx.a[q] += i64::from((mapped + 1 - ri_type as i32) >> 1);
    if ctx.n[q] == p.reset {
        ctx.a[q] >>= 1;
        ctx.n[q] >>= 1;
        ctx.nn[ri_type] >>= 1;
    }
    ctx.n[q] += 1;
    cur[x] = if ri_type == 1 {
        reconstruct(p, ra, err)
    } else if ra > rb {
        reconstruct(p, rb, -err)
    } else {
        reconstruct(p, rb, err)
    };
    ctx.run_index = ctx.run_index.saturating_sub(1);
    Ok(x + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOI: [u8; 2] = [0xFF, 0xD8];
    const EOI: [u8; 2] = [0xFF, 0xD9];

    /// SOF55 of a one-component image.
    fn sof(precision: u8, width: u16, height: u16) -> Vec<u8> {
        let (w, h) = (width.to_be_bytes(), height.to_be_bytes());
        vec![
            0xFF, 0xF7, 0, 11, precision, h[0], h[1], w[0], w[1], 1, 1, 0x11, 0,
        ]
    }

    fn sos(near: u8) -> Vec<u8> {
        vec![0xFF, 0xDA, 0, 8, 1, 1, 0, near, 0, 0]
    }

    fn stream(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn run_mode_across_lines() {
        // 4x2 zeros: every sample is in run mode; RUNindex climbs 0..4 on the first line (four
        // 1-sample segments) and 4..6 on the second (two 2-sample segments): six 1 bits.
        let data = stream(&[&SOI, &sof(8, 4, 2), &sos(0), &[0xFC], &EOI]);
        let image = decode(&data).unwrap();
        assert_eq!(
            (image.width, image.height, image.bits_per_sample),
            (4, 2, 8)
        );
        assert_eq!(image.samples, vec![0; 8]);
    }

    #[test]
    fn stuffed_bit_after_ff() {
        // 4x8 zeros take thirteen 1 bits; the first eight make a 0xFF byte, so the next byte
        // starts with a stuffed 0 that is not data: 0 11111 00.
        let data = stream(&[&SOI, &sof(8, 4, 8), &sos(0), &[0xFF, 0x7C], &EOI]);
        assert_eq!(decode(&data).unwrap().samples, vec![0; 32]);
    }

    #[test]
    fn run_interruption_sample() {
        // [0, 5]: a run of one (bit 1), interrupted (bit 0, no J[1] = 0 bits), then 5 in
        // context RItype 1: k = 2 (A 4, N 1), EMErrval = 2 * 5 - 1 = 9 = 001 01.
        let data = stream(&[&SOI, &sof(8, 2, 1), &sos(0), &[0b1000_1010], &EOI]);
        assert_eq!(decode(&data).unwrap().samples, vec![0, 5]);
    }

    #[test]
    fn restart_marker_and_app_segment() {
        // Two intervals of one line (4 zeros: four 1 bits each, contexts reset between), with
        // an APP0 segment to skip.
        let app = [0xFF, 0xE0, 0, 4, b'h', b'i'];
        let dri = [0xFF, 0xDD, 0, 4, 0, 1];
        let data = stream(&[
            &SOI,
            &app,
            &sof(8, 4, 2),
            &dri,
            &sos(0),
            &[0xF0, 0xFF, 0xD0, 0xF0],
            &EOI,
        ]);
        assert_eq!(decode(&data).unwrap().samples, vec![0; 8]);
        // The wrong restart number is an error.
        let bad = stream(&[
            &SOI,
            &sof(8, 4, 2),
            &dri,
            &sos(0),
            &[0xF0, 0xFF, 0xD3, 0xF0],
            &EOI,
        ]);
        assert!(decode(&bad).unwrap_err().contains("restart marker"));
    }

    #[test]
    fn truncation_is_an_error() {
        let data = stream(&[&SOI, &sof(8, 4, 8), &sos(0), &[0xFF, 0x7C], &EOI]);
        for n in 0..data.len() - 1 {
            assert!(decode(&data[..n]).is_err(), "{n} bytes");
        }
        // A scan whose data stops at EOI before its last line.
        let short = stream(&[&SOI, &sof(8, 4, 8), &sos(0), &[0xFF, 0x00], &EOI]);
        assert!(decode(&short).unwrap_err().contains("ends early"));
    }

    #[test]
    fn headers_that_are_refused() {
        let body = [0xFC, 0xFF, 0xD9];
        let with = |parts: &[&[u8]]| decode(&stream(parts)).unwrap_err();
        assert!(with(&[&[0x00, 0x01]]).contains("SOI"));
        assert!(with(&[&SOI, &sof(8, 65535, 65535), &sos(0), &body]).contains("limit"));
        assert!(with(&[&SOI, &sof(8, 0, 2), &sos(0), &body]).contains("width 0"));
        assert!(with(&[&SOI, &sof(8, 4, 0), &sos(0), &body]).contains("DNL"));
        assert!(with(&[&SOI, &sof(17, 4, 2), &sos(0), &body]).contains("precision"));
        assert!(with(&[&SOI, &sof(1, 4, 2), &sos(0), &body]).contains("precision"));
        assert!(with(&[&SOI, &sof(8, 4, 2), &sos(128), &body]).contains("NEAR"));
        assert!(with(&[&SOI, &sos(0), &body]).contains("before any SOF55"));
        assert!(with(&[&SOI, &sof(8, 4, 2), &EOI]).contains("before any scan"));
        let three = [
            0xFF, 0xF7, 0, 17, 8, 0, 2, 0, 4, 3, 1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0,
        ];
        assert!(with(&[&SOI, &three, &sos(0), &body]).contains("components"));
        let mapping = [0xFF, 0xF8, 0, 5, 2, 1, 1];
        assert!(with(&[&SOI, &mapping, &sof(8, 4, 2), &sos(0), &body]).contains("mapping"));
        let transform = [0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 0, 1];
        assert!(with(&[&SOI, &sof(8, 4, 2), &transform, &body]).contains("point transform"));
        let lse = |t1: u8| [0xFF, 0xF8, 0, 13, 1, 0, 255, 0, t1, 0, 7, 0, 21, 0, 64];
        assert!(with(&[&SOI, &sof(8, 4, 2), &lse(9), &sos(0), &body]).contains("thresholds"));
        let baseline = [0xFF, 0xC0, 0, 11, 8, 0, 2, 0, 4, 1, 1, 0x11, 0];
        let err = with(&[&SOI, &baseline]);
        assert!(err.contains("0xFFC0 at byte 2"), "{err}");
        let err = with(&[&SOI, &[0xFF, 0xC4, 0, 2]]);
        assert_eq!(err, "JPEG-LS: marker 0xFFC4 at byte 2 is not supported");
        let long = [0xFF, 0xFE, 0x10, 0x00, 0];
        assert!(with(&[&SOI, &long]).contains("past the end"));
    }

    #[test]
    fn custom_parameters_from_lse() {
        // The LSE values replace the defaults; zeros keep them.
        let lse = [0xFF, 0xF8, 0, 13, 1, 0, 200, 0, 4, 0, 0, 0, 50, 0, 10];
        let data = stream(&[&SOI, &sof(8, 4, 2), &lse, &sos(0), &[0xFC], &EOI]);
        assert_eq!(decode(&data).unwrap().samples, vec![0; 8]);
        let preset = Preset {
            maxval: 200,
            t1: 4,
            t2: 0,
            t3: 50,
            reset: 10,
        };
        let p = Params::new(8, 0, &preset).unwrap();
        assert_eq!((p.maxval, p.t1, p.t2, p.t3, p.reset), (200, 4, 7, 50, 10));
    }

    #[test]
    fn default_thresholds_follow_t87() {
        // T.87 C.2.4.1.1.1, including the MAXVAL < 128 branch and NEAR > 0.
        assert_eq!(default_thresholds(255, 0), (3, 7, 21));
        assert_eq!(default_thresholds(4095, 0), (18, 67, 276));
        assert_eq!(default_thresholds(65535, 0), (18, 67, 276));
        assert_eq!(default_thresholds(65535, 1), (21, 72, 283));
        assert_eq!(default_thresholds(63, 0), (2, 3, 5));
        assert_eq!(default_thresholds(15, 1), (3, 5, 8));
        assert_eq!(default_thresholds(3, 1), (3, 3, 3));
    }

    #[test]
    fn golomb_order() {
        for n in 1..300 {
            for a in 0..5000i64 {
                let mut k = 0;
                while (i64::from(n) << k) < a {
                    k += 1;
                }
                assert_eq!(golomb_k(n, a), k, "n {n} a {a}");
            }
        }
    }

    /// The first frame's codestream of an encapsulated (explicit VR little endian) DICOM file:
    /// the fragments after the basic offset table item, joined. Enough for these fixtures.
    fn codestream(dicom: &[u8]) -> Vec<u8> {
        let tag = [
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        let mut pos = dicom
            .windows(tag.len())
            .rposition(|w| w == tag)
            .expect("encapsulated Pixel Data")
            + tag.len();
        let mut out = Vec::new();
        let mut first = true;
        loop {
            let item = &dicom[pos..pos + 8];
            let len = u32::from_le_bytes([item[4], item[5], item[6], item[7]]) as usize;
            match item[..4] {
                [0xFE, 0xFF, 0x00, 0xE0] if first => first = false,
                [0xFE, 0xFF, 0x00, 0xE0] => out.extend_from_slice(&dicom[pos + 8..pos + 8 + len]),
                [0xFE, 0xFF, 0xDD, 0xE0] => return out,
                _ => panic!("unexpected item at {pos}"),
            }
            pos += 8 + len;
        }
    }

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/readers/dicom/compressed/jpegls/"
    );

    /// name, bits per sample in SOF55, NEAR: see data/readers/PROVENANCE.md.
    const CASES: [(&str, u8); 7] = [
        ("ls16_lossless", 16),
        ("ls12_lossless", 12),
        ("ls8_lossless", 8),
        ("ls16_near2", 16),
        ("ls12_near3_lse", 12),
        ("ls8_restart", 8),
        ("ls16_near1_restart", 16),
    ];

    fn fixture(name: &str) -> (Vec<u8>, Vec<u16>) {
        let dicom = std::fs::read(format!("{FIXTURES}{name}.dcm")).unwrap();
        let expected = std::fs::read(format!("{FIXTURES}{name}.u16")).unwrap();
        let expected = expected
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        (codestream(&dicom), expected)
    }

    #[test]
    fn fixtures_match_reference_decoders() {
        for (name, bits) in CASES {
            let (data, expected) = fixture(name);
            let image = decode(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((image.width, image.height), (112, 112), "{name}");
            assert_eq!(image.bits_per_sample, bits, "{name}");
            assert!(image.samples == expected, "{name}: samples differ");
        }
    }

    #[test]
    fn damaged_fixtures_give_errors_not_panics() {
        // Truncations and byte changes at spread-out places (a fixed xorshift sequence): any
        // result is fine as long as decode returns.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (name, _) in CASES {
            let (data, _) = fixture(name);
            for cut in (0..data.len()).step_by(997) {
                assert!(decode(&data[..cut]).is_err(), "{name} cut at {cut}");
            }
            for _ in 0..40 {
                let mut damaged = data.clone();
                for _ in 0..1 + next() % 3 {
                    let at = (next() % damaged.len() as u64) as usize;
                    damaged[at] = next() as u8;
                }
                let _ = decode(&damaged);
            }
        }
    }
}
