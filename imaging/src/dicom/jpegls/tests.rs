use super::scan::golomb_k;
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
