//! The Alveolus site agent: reads the site's own labelled CT, trains the global model on it, and
//! sends back only the weight update, its sample count and aggregate metrics.
//!
//! The agent only ever dials out. It never depends on the coordinator crate.

pub mod client;
pub mod data;
pub mod evaluate;
pub mod secure;
pub mod slices;

pub use client::{AgentError, AgentOptions, run_agent};
pub use slices::SliceDataset;
