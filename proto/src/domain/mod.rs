//! Domain types of the protocol, by topic, and their conversions from and to the generated
//! `pb` types: what a run is configured with (`config`), what a site is asked and sends back
//! (`task`), what a run and its rounds are (`run`), how a model travels (`model`), the sites' number format (`precision`), the learning
//! rate over rounds (`schedule`), what the coordinator does with an aggregate (`strategy`), evaluation at the sites
//! (`validation`).
//!
//! Conversions from `pb` check what protobuf cannot express (required sub-messages, value
//! ranges) so that code past the edge only ever sees valid values. The serde forms are what
//! the CLI prints as JSON; the coordinator's files on disk have their own, versioned types.

mod config;
mod model;
mod precision;
mod run;
mod schedule;
mod strategy;
mod task;
mod validation;

pub use config::*;
pub use model::*;
pub use precision::*;
pub use run::*;
pub use schedule::*;
pub use strategy::*;
pub use task::*;
pub use validation::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("message field `{0}` is missing")]
    Missing(&'static str),
    #[error("invalid value for `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> DomainError {
    DomainError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Checks a model version string: lower-case hex sha256.
pub fn validate_version(version: &str) -> Result<(), DomainError> {
    if version.len() == 64
        && version
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(invalid(
            "version",
            format!("`{version}` is not a sha256 in lower-case hex"),
        ))
    }
}

pub(crate) fn require_positive(field: &'static str, value: f64) -> Result<(), DomainError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} is not a positive number")))
    }
}

pub(crate) fn require_non_negative(field: &'static str, value: f64) -> Result<(), DomainError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} is not a non-negative number"),
        ))
    }
}

/// Protobuf's "unset" for an optional positive number.
pub(crate) fn positive(value: f64) -> Option<f64> {
    (value != 0.0).then_some(value)
}
