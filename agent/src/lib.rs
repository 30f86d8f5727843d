//! The Alveolus site agent, the site's federation client: it dials out, pulls the global model,
//! trains it on the site's own labelled CT (read by `alveolus-imaging`), and sends back only the
//! weight update, its sample count and aggregate metrics.
//!
//! The agent only ever dials out. It never depends on the coordinator crate.

pub mod client;
pub mod error;
mod kept;
pub mod local;
pub mod metrics;
pub mod secure;
pub mod site_data;
pub mod site_norms;
pub mod transport;

pub use client::{AgentOptions, run_agent};
pub use error::AgentError;
pub use metrics::AgentMetrics;
pub use site_data::SiteData;
