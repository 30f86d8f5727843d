//! Chunked transfers: every model or update travels as data chunks followed by the sha256 of
//! all data bytes. The receiver refuses a transfer whose size or digest does not match before
//! anything is made of its bytes.

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

/// Data bytes per message: a quarter of gRPC's default 4 MiB decode limit, whatever the model
/// size.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Splits a payload into chunks that each fit comfortably in one gRPC message.
pub fn chunks(payload: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    (0..payload.len())
        .step_by(CHUNK_BYTES)
        .map(move |start| payload.slice(start..(start + CHUNK_BYTES).min(payload.len())))
}

/// The 32-byte digest sent in a transfer's trailer.
pub fn digest(payload: &[u8]) -> Vec<u8> {
    Sha256::digest(payload).to_vec()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("transfer announced {announced} bytes, but {received} arrived")]
    SizeMismatch { announced: u64, received: u64 },
    #[error("transfer announces {announced} bytes, more than the {limit} accepted here")]
    TooLarge { announced: u64, limit: u64 },
    #[error("transfer digest mismatch: trailer says {claimed}, data hashes to {actual}")]
    DigestMismatch { claimed: String, actual: String },
    #[error("transfer ended without its sha256 trailer")]
    MissingTrailer,
    #[error("transfer message out of order: {0}")]
    OutOfOrder(&'static str),
}

/// Collects the data chunks of one transfer and checks them against the trailer.
///
/// Memory is bounded by the announced size, which is checked against a limit before any chunk
/// is accepted.
pub struct Receiver {
    announced: u64,
    buffer: BytesMut,
    hasher: Sha256,
}

impl Receiver {
    pub fn new(announced: u64, limit: u64) -> Result<Self, TransferError> {
        if announced > limit {
            return Err(TransferError::TooLarge { announced, limit });
        }
        Ok(Self {
            announced,
            buffer: BytesMut::with_capacity(announced as usize),
            hasher: Sha256::new(),
        })
    }

    pub fn push(&mut self, data: &[u8]) -> Result<(), TransferError> {
        let received = self.buffer.len() as u64 + data.len() as u64;
        if received > self.announced {
            return Err(TransferError::SizeMismatch {
                announced: self.announced,
                received,
            });
        }
        self.hasher.update(data);
        self.buffer.extend_from_slice(data);
        Ok(())
    }

    /// Checks size and digest; only then hands out the bytes.
    pub fn finish(self, claimed_sha256: &[u8]) -> Result<Bytes, TransferError> {
        let received = self.buffer.len() as u64;
        if received != self.announced {
            return Err(TransferError::SizeMismatch {
                announced: self.announced,
                received,
            });
        }
        let actual = self.hasher.finalize();
        if actual.as_slice() != claimed_sha256 {
            return Err(TransferError::DigestMismatch {
                claimed: hex::encode(claimed_sha256),
                actual: hex::encode(actual),
            });
        }
        Ok(self.buffer.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_payload_and_stay_small() {
        let payload = Bytes::from(vec![7u8; 2 * CHUNK_BYTES + 5]);
        let parts: Vec<Bytes> = chunks(&payload).collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.len() <= CHUNK_BYTES));
        assert_eq!(parts.iter().map(Bytes::len).sum::<usize>(), payload.len());
        assert_eq!(chunks(&Bytes::new()).count(), 0);
    }

    #[test]
    fn receiver_accepts_exact_transfer() {
        let payload = Bytes::from_static(b"weights");
        let mut rx = Receiver::new(payload.len() as u64, 100).unwrap();
        for part in chunks(&payload) {
            rx.push(&part).unwrap();
        }
        assert_eq!(rx.finish(&digest(&payload)).unwrap(), payload);
    }

    #[test]
    fn receiver_refuses_corruption_truncation_and_excess() {
        let payload = b"weights";
        let mut rx = Receiver::new(7, 100).unwrap();
        rx.push(b"weighTs").unwrap();
        assert!(matches!(
            rx.finish(&digest(payload)),
            Err(TransferError::DigestMismatch { .. })
        ));

        let mut rx = Receiver::new(7, 100).unwrap();
        rx.push(b"weight").unwrap();
        assert!(matches!(
            rx.finish(&digest(payload)),
            Err(TransferError::SizeMismatch { .. })
        ));

        let mut rx = Receiver::new(7, 100).unwrap();
        assert!(rx.push(b"weights!").is_err());
        assert!(matches!(
            Receiver::new(101, 100),
            Err(TransferError::TooLarge { .. })
        ));
    }
}
