//! Value lengths held against the bytes a DICOM file has left, before dicom-object allocates
//! what a damaged header declares.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use dicom_core::Tag;
use dicom_core::header::{HasLength, Header, Length};
use dicom_dictionary_std::tags;
use dicom_encoding::decode::Decode;
use dicom_encoding::decode::explicit_le::ExplicitVRLittleEndianDecoder;
use dicom_encoding::{Codec, TransferSyntax, TransferSyntaxIndex};
use dicom_object::FileMetaTable;
use dicom_parser::DataSetReader;
use dicom_parser::dataset::DataToken;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::ReadError;

/// Refuses a file in which a value is longer than what follows its header. dicom-object
/// allocates each value as long as its header says before reading it, so a few damaged bytes
/// (a length of 0xF8300002) would otherwise cost gigabytes. The file is parsed first as
/// dicom-object parses it (the same buffered reader, preamble, file meta group, then the data set
/// in its transfer syntax with the same parser) and each header is held against the bytes left
/// before its value is read; with `header_only`, only as far as [`super::open_header`] reads. Anything
/// else wrong is left to dicom-object, which names it.
pub(super) fn check_value_lengths(path: &Path, header_only: bool) -> Result<(), ReadError> {
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
