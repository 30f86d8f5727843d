//! What the agent writes at its site, for the site's own people: a copy of every update it
//! sent (the audit trail of what left) and, under FedBN, the site's own model of each round.
//! Nothing here crosses the wire.

use std::path::Path;

use alveolus_proto::domain::{EvaluateTask, UpdateHeader};
use alveolus_proto::sha256_hex;
use alveolus_proto::weights::Weights;

use crate::error::AgentError;
use crate::site_norms::SITE_SPECIFIC_METADATA_KEY;

/// FedBN: writes `model`, round `task.round`'s global model with site `site`'s normalisation
/// layers, as `RUN-roundNNNN.safetensors` in `dir`, whole or not at all.
pub fn site_model(
    dir: &Path,
    site: &str,
    task: &EvaluateTask,
    model: &Weights,
) -> Result<(), AgentError> {
    let mut model = model.clone();
    model.metadata.insert(
        SITE_SPECIFIC_METADATA_KEY.into(),
        format!(
            "normalisation layers (FedBN) of site {site}, as it trained them up to round {} of run {}",
            task.round, task.run_id
        ),
    );
    let path = dir.join(format!(
        "{}-round{:04}.safetensors",
        task.run_id, task.round
    ));
    let partial = path.with_extension("partial");
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&partial, model.encode()))
        .and_then(|_| std::fs::rename(&partial, &path))
        .map_err(|e| AgentError::SiteModel {
            path: path.clone(),
            message: e.to_string(),
        })?;
    tracing::info!(round = task.round, path = %path.display(), "this site's own model (FedBN) written");
    Ok(())
}

/// Writes the update about to be sent, byte for byte, and a JSON record of its header into
/// `dir` (when the site keeps an audit trail).
pub fn audit_copy(
    dir: Option<&Path>,
    header: &UpdateHeader,
    bytes: &[u8],
) -> Result<(), AgentError> {
    let Some(dir) = dir else {
        return Ok(());
    };
    let stem = format!("{}-round{:04}", header.run_id, header.round);
    let extension = if header.masked {
        "masked"
    } else {
        "safetensors"
    };
    let write = |name: String, contents: &[u8]| {
        let path = dir.join(name);
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&path, contents))
            .map_err(|e| AgentError::Audit {
                path,
                message: e.to_string(),
            })
    };
    write(format!("{stem}.{extension}"), bytes)?;
    let record = serde_json::json!({
        "run_id": header.run_id,
        "round": header.round,
        "base_version": header.base_version,
        "num_samples": header.num_samples,
        "loss": header.metrics.loss,
        "dice": header.metrics.dice,
        "masked": header.masked,
        "sha256": sha256_hex(bytes),
    });
    write(format!("{stem}.json"), record.to_string().as_bytes())
}
