//! `model pull` (admin or site kit): a model and its manifest, digest verified.

use std::path::PathBuf;

use alveolus_models::Weights;
use alveolus_proto::client::pull_model_with_kit_reporting;
use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download a model (the latest by default); its digest is verified. The manifest goes
    /// beside it as FILE with the extension .json.
    Pull {
        #[arg(long)]
        kit: PathBuf,
        #[arg(long, default_value = "")]
        version: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Downloads a model with a site or an admin kit, digest verified, and writes it and its
/// manifest.
pub async fn model_command(command: ModelCommand) -> Result<()> {
    let ModelCommand::Pull { kit, version, out } = command;
    let mut progress = crate::progress::TransferProgress::new("model");
    let pulled = pull_model_with_kit_reporting(&kit, &version, &mut |received, total| {
        progress.update(received, total)
    })
    .await;
    progress.finish();
    let (header, bytes) = pulled?;
    Weights::decode(&bytes).context("the coordinator sent a model that does not parse")?;
    std::fs::write(&out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    let manifest = out.with_extension("json");
    std::fs::write(&manifest, &header.manifest_json)
        .with_context(|| format!("cannot write {}", manifest.display()))?;
    println!(
        "model {} ({} bytes, sha256 verified)",
        header.version,
        bytes.len()
    );
    println!(
        "written to {} with its manifest {}",
        out.display(),
        manifest.display()
    );
    Ok(())
}
