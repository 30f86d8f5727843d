//! The size a JPEG or JPEG 2000 frame says it decodes to, checked against the DICOM header
//! before dicom-pixeldata decodes it: its adapters copy the decoded samples into a buffer sized
//! from Rows, Columns and Bits Allocated and index past its end when the codestream describes a
//! larger image, more components or wider samples. The codestream's own header is the truth the
//! decoder follows, so it is read here the way the decoder reads it.

/// Transfer syntaxes whose frames are JPEG interchange streams (ISO 10918-1), decoded by
/// jpeg-decoder: baseline, extended, lossless and lossless first-order prediction.
const JPEG: [&str; 4] = [
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];

/// Transfer syntaxes whose frames are JPEG 2000 codestreams (ISO 15444-1 and -15, HTJ2K),
/// decoded by OpenJPEG.
const JPEG_2000: [&str; 7] = [
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
];

/// What the DICOM header promises about the one frame of a slice.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frame {
    pub rows: usize,
    pub columns: usize,
    pub bits_allocated: usize,
}

/// Refuses a coded frame whose codestream disagrees with `frame` in size, components or sample
/// width. Transfer syntaxes other than JPEG and JPEG 2000 pass: their decoders append what they
/// decode rather than writing into a buffer sized in advance.
pub(super) fn check_coded_frame(syntax: &str, data: &[u8], frame: Frame) -> Result<(), String> {
    if JPEG.contains(&syntax) {
        check_jpeg(data, frame)
    } else if JPEG_2000.contains(&syntax) {
        check_jpeg_2000(data, frame)
    } else {
        Ok(())
    }
}

/// Markers that stand alone, without a length: TEM, the restart markers, SOI and EOI.
fn jpeg_marker_has_length(marker: u8) -> bool {
    !matches!(marker, 0x01 | 0xD0..=0xD9)
}

/// Start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
fn is_start_of_frame(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

fn check_jpeg(data: &[u8], frame: Frame) -> Result<(), String> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Err("the JPEG frame does not start with a start-of-image marker".into());
    }
    let mut at = 2;
    loop {
        // Markers as the decoder finds them: bytes before an 0xFF are skipped, fill bytes
        // (0xFF) before a marker are skipped, and 0xFF 0x00 is not a marker.
        let marker = loop {
            let Some(offset) = data
                .get(at..)
                .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
            else {
                return Err("the JPEG frame ends before its frame header".into());
            };
            at += offset + 1;
            while data.get(at) == Some(&0xFF) {
                at += 1;
            }
            match data.get(at) {
                None => return Err("the JPEG frame ends before its frame header".into()),
                Some(0x00) => at += 1,
                Some(&marker) => {
                    at += 1;
                    break marker;
                }
            }
        };
        if marker == 0xDA || marker == 0xD9 {
            return Err("the JPEG frame has no frame header before its scan".into());
        }
        if !jpeg_marker_has_length(marker) {
            continue;
        }
        let length: usize = be_u16(data, at)
            .ok_or("the JPEG frame ends inside a marker segment")?
            .into();
        if is_start_of_frame(marker) {
            return check_jpeg_frame_header(data.get(at..at + length), frame);
        }
        if length < 2 {
            return Err(format!("a JPEG marker segment of length {length}"));
        }
        at += length;
    }
}

/// The frame header (ISO 10918-1 B.2.2): length, precision P, lines Y, samples per line X,
/// components Nf.
fn check_jpeg_frame_header(segment: Option<&[u8]>, frame: Frame) -> Result<(), String> {
    let segment = segment
        .filter(|s| s.len() >= 8)
        .ok_or("the JPEG frame header is cut short")?;
    let precision = usize::from(segment[2]);
    let lines = usize::from(u16::from_be_bytes([segment[3], segment[4]]));
    let columns = usize::from(u16::from_be_bytes([segment[5], segment[6]]));
    let components = segment[7];
    if (lines, columns) != (frame.rows, frame.columns) {
        return Err(format!(
            "the JPEG frame is {columns}x{lines} but the header says {}x{} (Columns x Rows)",
            frame.columns, frame.rows
        ));
    }
    if components != 1 {
        return Err(format!(
            "the JPEG frame has {components} components; a CT slice has one sample per pixel"
        ));
    }
    let decoded_bits = if precision > 8 { 16 } else { 8 };
    if decoded_bits != frame.bits_allocated {
        return Err(format!(
            "the JPEG frame holds {precision}-bit samples but Bits Allocated is {}",
            frame.bits_allocated
        ));
    }
    Ok(())
}

/// A bare codestream (PS3.5 A.4.4: no JP2 file header) whose image and tile size segment (ISO
/// 15444-1 A.5.1) gives the image area, the components, their precision and subsampling.
fn check_jpeg_2000(data: &[u8], frame: Frame) -> Result<(), String> {
    if !data.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        return Err(
            "the JPEG 2000 frame is not a bare codestream starting with its size segment".into(),
        );
    }
    let siz = &data[2..];
    let field = |at: usize| {
        siz.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let cut = || "the JPEG 2000 size segment is cut short".to_string();
    let (width, height, x_origin, y_origin) = (
        field(6).ok_or_else(cut)?,
        field(10).ok_or_else(cut)?,
        field(14).ok_or_else(cut)?,
        field(18).ok_or_else(cut)?,
    );
    let components = be_u16(siz, 38).ok_or_else(cut)?;
    let [precision, x_step, y_step] = siz
        .get(40..43)
        .and_then(|b| <[u8; 3]>::try_from(b).ok())
        .ok_or_else(cut)?;
    let area = width
        .checked_sub(x_origin)
        .zip(height.checked_sub(y_origin));
    if area != Some((frame.columns, frame.rows)) {
        return Err(format!(
            "the JPEG 2000 image area does not match the header's {}x{} (Columns x Rows)",
            frame.columns, frame.rows
        ));
    }
    if components != 1 {
        return Err(format!(
            "the JPEG 2000 frame has {components} components; a CT slice has one sample per pixel"
        ));
    }
    if (x_step, y_step) != (1, 1) {
        return Err("the JPEG 2000 component is subsampled".into());
    }
    let bits = usize::from(precision & 0x7F) + 1;
    if bits > frame.bits_allocated {
        return Err(format!(
            "the JPEG 2000 frame holds {bits}-bit samples but Bits Allocated is {}",
            frame.bits_allocated
        ));
    }
    Ok(())
}

fn be_u16(data: &[u8], at: usize) -> Option<u16> {
    data.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLICE: Frame = Frame {
        rows: 4,
        columns: 6,
        bits_allocated: 16,
    };

    /// SOI, an APP0 segment, padding fill bytes, then a frame header.
    fn jpeg(precision: u8, lines: u16, columns: u16, components: u8) -> Vec<u8> {
        let mut data = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAB, 0xCD, 0xFF, 0xFF];
        data.extend([0xC3, 0x00, 8 + 3 * components, precision]);
        data.extend(lines.to_be_bytes());
        data.extend(columns.to_be_bytes());
        data.push(components);
        for c in 0..components {
            data.extend([c + 1, 0x11, 0]);
        }
        data.extend([0xFF, 0xDA, 0x00, 0x08]);
        data
    }

    fn j2k(width: u32, height: u32, origin: u32, components: u16, precision: u8) -> Vec<u8> {
        let mut data = vec![0xFF, 0x4F, 0xFF, 0x51];
        data.extend((38 + 3 * components).to_be_bytes());
        data.extend(0u16.to_be_bytes());
        for v in [width, height, origin, origin, width, height, 0, 0] {
            data.extend(v.to_be_bytes());
        }
        data.extend(components.to_be_bytes());
        for _ in 0..components {
            data.extend([precision - 1, 1, 1]);
        }
        data
    }

    #[test]
    fn codestreams_are_held_to_the_header() {
        let lossless = "1.2.840.10008.1.2.4.70";
        let j2k_lossless = "1.2.840.10008.1.2.4.90";
        let cases: [(&str, Vec<u8>, Option<&str>); 11] = [
            (lossless, jpeg(12, 4, 6, 1), None),
            (
                lossless,
                jpeg(12, 8, 6, 1),
                Some("is 6x8 but the header says 6x4"),
            ),
            (lossless, jpeg(12, 4, 6, 3), Some("3 components")),
            (
                lossless,
                jpeg(8, 4, 6, 1),
                Some("8-bit samples but Bits Allocated is 16"),
            ),
            (
                lossless,
                vec![0xFF, 0xD8, 0xFF, 0xDA],
                Some("no frame header"),
            ),
            (
                lossless,
                vec![0xFF, 0xD8, 0xFF, 0xC0, 0, 9],
                Some("cut short"),
            ),
            (lossless, b"not a jpeg".to_vec(), Some("start-of-image")),
            (j2k_lossless, j2k(6, 4, 0, 1, 16), None),
            (j2k_lossless, j2k(9, 7, 1, 1, 12), Some("image area")),
            (j2k_lossless, j2k(6, 4, 0, 3, 12), Some("3 components")),
            (
                "1.2.840.10008.1.2.4.201",
                j2k(6, 4, 0, 1, 12)[..30].to_vec(),
                Some("cut short"),
            ),
        ];
        for (syntax, data, refused) in cases {
            let result = check_coded_frame(syntax, &data, SLICE);
            match refused {
                None => assert_eq!(result, Ok(()), "{data:02X?}"),
                Some(why) => {
                    let err = result.expect_err(why);
                    assert!(err.contains(why), "{err:?} does not say {why:?}");
                }
            }
        }
    }

    #[test]
    fn other_syntaxes_are_left_to_their_decoders() {
        assert_eq!(
            check_coded_frame("1.2.840.10008.1.2.4.80", b"anything", SLICE),
            Ok(())
        );
    }
}
