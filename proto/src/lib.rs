//! The boundary between Alveolus processes.
//!
//! Generated protobuf types live in [`pb`] and are converted to the domain types of [`domain`] at
//! the gRPC edge; nothing past the edge handles `pb` types. Everything both ends must agree on
//! lives here: identities in certificates, the chunked transfer with its sha256 trailer, and the
//! named-tensor codec that models and updates travel in.

pub mod client;
pub mod domain;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod kit;
pub mod proxy;
pub mod transfer;
pub mod weights;

/// Generated protobuf and gRPC code. Only the gRPC edge (coordinator service, agent and admin
/// clients) may use these types.
pub mod pb {
    tonic::include_proto!("alveolus.v1");
}

/// The protocol this build speaks. Bumped on any incompatible change of `alveolus.proto` or of
/// the tensor codec; a coordinator refuses agents that speak another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Installs the process-wide rustls crypto provider (ring). tonic enables none by itself, and
/// two providers in the graph make rustls refuse to pick. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Wall-clock milliseconds since the Unix epoch, for what is recorded and shown.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Lower-case hex of a sha256 digest: the form model versions take everywhere.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
