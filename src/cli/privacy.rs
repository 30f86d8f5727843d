//! `privacy plan`: the ε a planned DP-FedAvg run would spend, before it is started.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum PrivacyCommand {
    /// The epsilon a planned DP-FedAvg run would spend (Rényi-DP accountant of the sampled
    /// Gaussian mechanism), to choose settings before starting it.
    Plan {
        /// Noise multiplier: noise standard deviation over the clip norm.
        #[arg(long)]
        noise: f64,
        #[arg(long)]
        rounds: u64,
        /// Fraction of sites taking part in each round (1: every site, as runs do now).
        #[arg(long, default_value_t = 1.0)]
        sample_rate: f64,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        #[arg(long)]
        json: bool,
    },
}

pub fn privacy_command(command: PrivacyCommand) -> Result<()> {
    let PrivacyCommand::Plan {
        noise,
        rounds,
        sample_rate,
        delta,
        json,
    } = command;
    let spent = alveolus_privacy::epsilon_after(sample_rate, noise, rounds, delta)?;
    if json {
        let report = serde_json::json!({
            "noise_multiplier": noise,
            "rounds": rounds,
            "sample_rate": sample_rate,
            "delta": delta,
            "epsilon": spent.epsilon,
            "rdp_order": spent.order,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "epsilon {:.4} at delta {delta} after {rounds} rounds (noise multiplier {noise}, sample rate {sample_rate}; RDP order {})",
        spent.epsilon, spent.order
    );
    for fraction in [4, 2] {
        let r = rounds / fraction;
        if r > 0 {
            let e = alveolus_privacy::epsilon_after(sample_rate, noise, r, delta)?;
            println!("  after {r} rounds: epsilon {:.4}", e.epsilon);
        }
    }
    Ok(())
}
