//! How a model travels: the header before its chunks.

use super::{DomainError, validate_version};
use crate::pb;
#[derive(Debug, Clone, PartialEq)]
pub struct ModelHeader {
    pub version: String,
    pub total_bytes: u64,
    pub manifest_json: String,
}

impl From<ModelHeader> for pb::ModelHeader {
    fn from(h: ModelHeader) -> Self {
        Self {
            version: h.version,
            total_bytes: h.total_bytes,
            manifest_json: h.manifest_json,
        }
    }
}

impl TryFrom<pb::ModelHeader> for ModelHeader {
    type Error = DomainError;
    fn try_from(h: pb::ModelHeader) -> Result<Self, DomainError> {
        validate_version(&h.version)?;
        Ok(Self {
            version: h.version,
            total_bytes: h.total_bytes,
            manifest_json: h.manifest_json,
        })
    }
}
