//! Privacy accounting for client-level differentially private federated averaging
//! (DP-FedAvg, McMahan et al. 2018): each round is a sampled Gaussian mechanism (sites sampled
//! with probability `q`, clipped updates summed, Gaussian noise of `z` times the clip norm), and
//! the rounds compose in Rényi differential privacy (Mironov 2017; the sampled mechanism's RDP
//! after Mironov, Talwar and Zhang 2019), converted to (ε, δ) with the bound of Canonne, Kamath
//! and Steinke 2020 (Prop. 12). The computation follows Google's dp-accounting
//! (`rdp_privacy_accountant`) step by step, orders included, so ε agrees with it (checked by
//! `tests/privacy_accountant.rs`).
//!
//! `dp` holds the mechanism's two halves: clipping (sites) and Gaussian noise (coordinator).
//!
//! The coordinator never depends on models or agents; this crate depends on neither.

pub mod accountant;
pub mod dp;
pub mod secagg;
pub mod wire;

pub use accountant::{AccountantError, PrivacySpent, RdpAccountant, epsilon_after, run_epsilon};
