//! The entropy-coded data of a JPEG-LS scan (T.87 Annex A): the bit reader with its stuffed
//! bits, context modelling, Golomb decoding, bias correction and run mode.

use super::{Frame, J, MAX_C, MIN_C, Params, REGULAR_CONTEXTS, next_marker};

/// Why the entropy-coded data could not be decoded; turned into a message with the byte
/// offset by the caller, which knows where the reader stopped.
pub(super) enum Fault {
    /// More bits were needed than the segment before the next marker holds.
    End,
    /// A code that no conforming encoder writes.
    Invalid(&'static str),
}

/// Reads the entropy-coded data of a scan, MSB first. A 0xFF data byte is followed by a byte
/// whose top bit is a stuffed 0 (T.87 A.1), so that byte gives 7 bits; a 0xFF followed by a
/// byte with the top bit set is a marker and ends the data.
pub(super) struct BitReader<'a> {
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
pub(super) struct Contexts {
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
pub(super) fn golomb_k(n: i32, a: i64) -> u32 {
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
pub(super) fn reconstruct(p: &Params, predicted: i32, error: i32) -> i32 {
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
pub(super) fn decode_scan(
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
pub(super) fn gradient_table(p: &Params) -> Vec<i8> {
    let m = p.maxval;
    let span = p.t1.max(p.t2).max(p.t3).max(p.near + 1).min(m);
    let mut table = vec![-4i8; (m - span) as usize];
    table.extend((-span..=span).map(|d| quantize_gradient(d, p)));
    table.resize(2 * m as usize + 1, 4);
    table
}

pub(super) fn quantize_gradient(d: i32, p: &Params) -> i8 {
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
pub(super) fn decode_line(
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
pub(super) fn update_regular(ctx: &mut Contexts, q: usize, err: i32, p: &Params) {
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
pub(super) fn decode_run(
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
