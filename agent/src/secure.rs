//! The site's side of a securely aggregated round over gRPC: send keys, share them, mask the
//! update, reveal shares for unmasking (see `alveolus_privacy::secagg`). What leaves the site
//! here: two fresh public keys, shares only their recipients can open, the masked update, and
//! at the end shares of secrets that unmask only the sum.

use alveolus_privacy::secagg::{self, SiteSession};
use alveolus_privacy::wire::{Reply, Request, Step};
use alveolus_proto::domain::{Metrics, TrainTask, UpdateHeader};
use alveolus_proto::pb;
use alveolus_proto::weights::Weights;
use bytes::Bytes;
use prost::Message;
use rand::SeedableRng;

use crate::transport::{Federation, Traffic};

/// How long the coordinator may hold one step waiting for its phase to close.
const STEP_WAIT_SECONDS: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The coordinator refused a step (the call's status).
    #[error("{0}")]
    Status(#[from] tonic::Status),
    /// What the coordinator sent breaks the protocol; this site takes no further part.
    #[error("secure aggregation: {0}")]
    Protocol(String),
}

impl From<secagg::SecAggError> for SecureError {
    fn from(e: secagg::SecAggError) -> Self {
        SecureError::Protocol(e.to_string())
    }
}

/// Sends one step, asking again while the coordinator answers Pending.
async fn step(
    client: &mut Federation,
    task: &TrainTask,
    step: Step,
    traffic: &mut Traffic,
) -> Result<Reply, SecureError> {
    let request: pb::SecAggRequest = Request {
        run_id: task.run_id.clone(),
        round: task.round,
        wait_seconds: STEP_WAIT_SECONDS,
        step,
    }
    .into();
    loop {
        traffic.sent += request.encoded_len() as u64;
        let reply = client
            .secure_aggregation(request.clone())
            .await?
            .into_inner();
        traffic.received += reply.encoded_len() as u64;
        let reply = Reply::try_from(reply).map_err(|e| SecureError::Protocol(e.to_string()))?;
        if reply != Reply::Pending {
            return Ok(reply);
        }
    }
}

fn unexpected(reply: &Reply, wanted: &str) -> SecureError {
    SecureError::Protocol(format!("expected {wanted}, the coordinator sent {reply:?}"))
}

/// Phases 1 and 2: fresh keys, the roster, shares out and shares in. Returns the session that
/// masks this site's update.
pub async fn join_round(
    client: &mut Federation,
    task: &TrainTask,
    site: &str,
    traffic: &mut Traffic,
) -> Result<SiteSession, SecureError> {
    let context = secagg::RoundContext {
        run_id: task.run_id.clone(),
        round: task.round,
    };
    // A CSPRNG that may live across awaits (the thread-local one may not).
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut session = SiteSession::new(context, site, &mut rng);
    let roster = match step(client, task, Step::Keys(session.public_keys()), traffic).await? {
        Reply::Roster(roster) => roster,
        other => return Err(unexpected(&other, "the roster")),
    };
    if let Some(secure) = task.secure_aggregation
        && roster.threshold != secure.threshold as usize
    {
        return Err(SecureError::Protocol(format!(
            "the roster's threshold {} is not the task's {}",
            roster.threshold, secure.threshold
        )));
    }
    let shares = session.share_keys(roster, &mut rng)?;
    match step(client, task, Step::Shares(shares), traffic).await? {
        Reply::Inbox { sharers, envelopes } => session.receive_shares(&sharers, &envelopes)?,
        other => return Err(unexpected(&other, "the shares for this site")),
    }
    Ok(session)
}

/// The masked update's words: `update` (plus its share of the DP noise) and the metrics, times
/// `weight`, then `weight`; masked by `session`.
pub fn mask_update(
    session: &SiteSession,
    update: &Weights,
    metrics: Metrics,
    weight: u64,
    noise_std: Option<f64>,
) -> Result<Vec<u64>, SecureError> {
    let mut rng = rand::rng();
    let values = update
        .tensors
        .values()
        .flat_map(|t| t.values.iter().copied())
        .map(|v| {
            let noise = noise_std.map_or(0.0, |std| {
                alveolus_privacy::dp::gaussian_noise(std, &mut rng)
            });
            v + noise as f32
        });
    let (mut words, clipped) = secagg::quantize_update(values, metrics, weight);
    if clipped > 0 {
        tracing::warn!(
            clipped,
            range = secagg::VALUE_RANGE,
            "update values beyond the fixed-point range were clipped"
        );
    }
    session.mask(&mut words)?;
    Ok(words)
}

/// The header and bytes of a masked update for `task`.
pub fn masked_message(task: &TrainTask, words: &[u64]) -> (UpdateHeader, Bytes) {
    let bytes: Bytes = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let header = UpdateHeader {
        run_id: task.run_id.clone(),
        round: task.round,
        base_version: task.model_version.clone(),
        num_samples: 0,
        metrics: Metrics::default(),
        total_bytes: bytes.len() as u64,
        masked: true,
        train_seconds: None,
    };
    (header, bytes)
}

/// Phase 4: waits for the survivors and reveals this site's shares for them.
pub async fn reveal(
    client: &mut Federation,
    task: &TrainTask,
    session: &SiteSession,
    traffic: &mut Traffic,
) -> Result<usize, SecureError> {
    let survivors = match step(client, task, Step::AwaitSurvivors, traffic).await? {
        Reply::Survivors(survivors) => survivors,
        other => return Err(unexpected(&other, "the survivors")),
    };
    let shares = session.reveal(&survivors)?;
    match step(client, task, Step::Reveal(shares), traffic).await? {
        Reply::Revealed => Ok(survivors.len()),
        other => Err(unexpected(&other, "an acknowledgement")),
    }
}
