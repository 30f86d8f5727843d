//! Chunked transfers: every model or update travels as data chunks followed by the sha256 of
//! all data bytes. The receiver refuses a transfer whose size or digest does not match before
//! anything is made of its bytes.

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::pb;

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

/// One message of a chunked transfer, split into what it carries.
pub enum Frame<H> {
    Header(H),
    Data(Bytes),
    Trailer(Vec<u8>),
}

/// A generated message type that carries transfer frames (`oneof part { header, data, trailer }`).
pub trait Framed: Sized {
    type Header;
    fn from_frame(frame: Frame<Self::Header>) -> Self;
    /// `None` for a message without a part.
    fn into_frame(self) -> Option<Frame<Self::Header>>;
}

macro_rules! framed {
    ($message:ty, $part:ident, $header:ty, $variant:ident) => {
        impl Framed for $message {
            type Header = $header;
            fn from_frame(frame: Frame<$header>) -> Self {
                use pb::$part::Part;
                let part = match frame {
                    Frame::Header(h) => Part::$variant(h),
                    Frame::Data(d) => Part::Data(d),
                    Frame::Trailer(sha256) => Part::Trailer(pb::TransferTrailer {
                        sha256: sha256.into(),
                    }),
                };
                Self { part: Some(part) }
            }
            fn into_frame(self) -> Option<Frame<$header>> {
                use pb::$part::Part;
                Some(match self.part? {
                    Part::$variant(h) => Frame::Header(h),
                    Part::Data(d) => Frame::Data(d),
                    Part::Trailer(t) => Frame::Trailer(t.sha256.to_vec()),
                })
            }
        }
    };
}

framed!(pb::ModelChunk, model_chunk, pb::ModelHeader, Header);
framed!(pb::UpdateChunk, update_chunk, pb::UpdateHeader, Header);
framed!(pb::StartRunChunk, start_run_chunk, pb::RunConfig, Config);

/// The messages of one transfer: `header`, the payload in chunks, the payload's sha256.
pub fn framed<M: Framed>(header: M::Header, payload: &Bytes) -> Vec<M> {
    std::iter::once(Frame::Header(header))
        .chain(chunks(payload).map(Frame::Data))
        .chain(std::iter::once(Frame::Trailer(digest(payload))))
        .map(M::from_frame)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("stream broken: {0}")]
    Stream(tonic::Status),
}

/// Reads a transfer's header (the first message).
pub async fn receive_header<M: Framed>(
    stream: &mut (impl Stream<Item = Result<M, tonic::Status>> + Unpin),
) -> Result<M::Header, ReceiveError> {
    match stream.next().await {
        Some(message) => match message.map_err(ReceiveError::Stream)?.into_frame() {
            Some(Frame::Header(h)) => Ok(h),
            _ => Err(TransferError::OutOfOrder("a transfer must start with its header").into()),
        },
        None => Err(TransferError::OutOfOrder("the stream is empty").into()),
    }
}

/// Reads the data chunks and the trailer that follow a header, checking size and digest.
pub async fn receive_payload<M: Framed>(
    stream: &mut (impl Stream<Item = Result<M, tonic::Status>> + Unpin),
    announced: u64,
    limit: u64,
) -> Result<Bytes, ReceiveError> {
    receive_payload_reporting(stream, announced, limit, &mut |_| {}).await
}

/// [`receive_payload`], telling `progress` the bytes received so far after each chunk (a
/// terminal's progress bar).
pub async fn receive_payload_reporting<M: Framed>(
    stream: &mut (impl Stream<Item = Result<M, tonic::Status>> + Unpin),
    announced: u64,
    limit: u64,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Bytes, ReceiveError> {
    let mut receiver = Receiver::new(announced, limit)?;
    let mut received = 0u64;
    while let Some(message) = stream.next().await {
        match message.map_err(ReceiveError::Stream)?.into_frame() {
            Some(Frame::Data(data)) => {
                receiver.push(&data)?;
                received += data.len() as u64;
                progress(received);
            }
            Some(Frame::Trailer(sha256)) => return Ok(receiver.finish(&sha256)?),
            _ => {
                return Err(
                    TransferError::OutOfOrder("a second header or an empty message").into(),
                );
            }
        }
    }
    Err(TransferError::MissingTrailer.into())
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
    fn framed_transfer_round_trips_through_the_receiver() {
        let payload = Bytes::from(vec![3u8; CHUNK_BYTES + 10]);
        let messages: Vec<pb::UpdateChunk> = framed(pb::UpdateHeader::default(), &payload);
        assert_eq!(messages.len(), 4);
        let mut stream = futures::stream::iter(messages.into_iter().map(Ok));
        let mut told = Vec::new();
        let received = futures::executor::block_on(async {
            receive_header(&mut stream).await.unwrap();
            receive_payload_reporting(&mut stream, payload.len() as u64, u64::MAX, &mut |n| {
                told.push(n)
            })
            .await
            .unwrap()
        });
        // Progress after each chunk, ending at the whole payload.
        assert_eq!(told, [CHUNK_BYTES as u64, payload.len() as u64]);
        assert_eq!(received, payload);
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

/// Largest model a client accepts (a coordinator cannot make it reserve more).
pub const MAX_MODEL_BYTES: u64 = 4 << 30;

/// Why a model download was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelReceiveError {
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error("model header: {0}")]
    Header(#[from] crate::domain::DomainError),
    #[error("asked for model {requested}, received {received}")]
    WrongVersion { requested: String, received: String },
    #[error("model digest does not match its version")]
    Digest,
}

/// Receives a model stream (header, chunks, trailer), verifying that its sha256 is its version
/// and, unless `requested` is empty (the latest), that it is the version asked for.
pub async fn receive_model(
    stream: tonic::Streaming<pb::ModelChunk>,
    requested: &str,
) -> Result<(crate::domain::ModelHeader, Bytes), ModelReceiveError> {
    receive_model_reporting(stream, requested, &mut |_, _| {}).await
}

/// [`receive_model`], telling `progress` the bytes received so far and the model's size after
/// each chunk.
pub async fn receive_model_reporting(
    mut stream: tonic::Streaming<pb::ModelChunk>,
    requested: &str,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(crate::domain::ModelHeader, Bytes), ModelReceiveError> {
    let header = receive_header(&mut stream).await?;
    let header = crate::domain::ModelHeader::try_from(header)?;
    if !requested.is_empty() && header.version != requested {
        return Err(ModelReceiveError::WrongVersion {
            requested: requested.to_string(),
            received: header.version,
        });
    }
    let total = header.total_bytes;
    let bytes = receive_payload_reporting(&mut stream, total, MAX_MODEL_BYTES, &mut |received| {
        progress(received, total)
    })
    .await?;
    if crate::sha256_hex(&bytes) != header.version {
        return Err(ModelReceiveError::Digest);
    }
    Ok((header, bytes))
}
