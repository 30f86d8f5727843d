//! Researcher and site commands that talk to the coordinator: the CLI's gRPC edge.

use std::path::Path;

use alveolus_agent::transport::receive_model;
use alveolus_models::Weights;
use alveolus_proto::domain::{RunConfig, RunEvent, RunInfo, RunState, SiteInfo};
use alveolus_proto::identity::Role;
use alveolus_proto::kit::ClientKit;
use alveolus_proto::pb::{self, admin_client::AdminClient, federation_client::FederationClient};
use alveolus_proto::transfer::framed;
use anyhow::{Context, Result, bail};
use futures::{Stream, StreamExt};
use tonic::transport::Channel;

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("coordinator: {} ({:?})", e.message(), e.code())
}

pub async fn admin_client(kit_dir: &Path) -> Result<AdminClient<Channel>> {
    let kit = ClientKit::load(kit_dir)?;
    if kit.identity.role != Role::Admin {
        bail!(
            "{} is a {} kit; this command needs an admin kit",
            kit_dir.display(),
            kit.identity.role
        );
    }
    Ok(AdminClient::new(kit.connect().await?))
}

pub async fn start_run(kit: &Path, config: RunConfig, weights: &Weights) -> Result<RunInfo> {
    let mut client = admin_client(kit).await?;
    start_run_with(&mut client, config, weights).await
}

pub async fn start_run_with(
    client: &mut AdminClient<Channel>,
    config: RunConfig,
    weights: &Weights,
) -> Result<RunInfo> {
    let bytes = weights.encode();
    let mut config = pb::RunConfig::from(config);
    config.initial_model_bytes = bytes.len() as u64;
    let messages: Vec<pb::StartRunChunk> = framed(config, &bytes);
    let info = client
        .start_run(futures::stream::iter(messages))
        .await
        .map_err(status)?
        .into_inner();
    Ok(RunInfo::try_from(info)?)
}

fn print_run(info: &RunInfo) {
    println!("run {}  {}", info.run_id, info.state.as_str());
    println!(
        "  {} of {} rounds finished; min {} sites; deadline {} s; {} local epochs; lr {}",
        info.rounds.len(),
        info.config.rounds,
        info.config.min_sites,
        info.config.deadline_seconds,
        info.config.training.local_epochs,
        info.config.training.learning_rate
    );
    if let Some(p) = &info.config.privacy {
        println!(
            "  differential privacy: clip {}, noise multiplier {}, delta {}{}; epsilon spent {:.4}",
            p.clip_norm,
            p.noise_multiplier,
            p.delta,
            p.epsilon_budget
                .map(|b| format!(", budget {b}"))
                .unwrap_or_default(),
            info.rounds.last().and_then(|r| r.epsilon).unwrap_or(0.0)
        );
    }
    if let Some(secure) = &info.config.secure_aggregation {
        println!(
            "  secure aggregation: the coordinator sees only sums; threshold {} sites",
            secure.threshold
        );
    }
    for r in &info.rounds {
        println!(
            "  round {:>3}  sites {}  samples {:>5}  loss {:.4}  train dice {:.3}  model {}{}",
            r.round,
            r.sites.len(),
            r.samples,
            r.loss,
            r.dice,
            &r.version[..12],
            r.epsilon
                .map(|e| format!("  epsilon {e:.4}"))
                .unwrap_or_default()
        );
    }
    if let Some(reason) = &info.stop_reason {
        let how = if info.state == RunState::Failed {
            "failed"
        } else {
            "stopped early"
        };
        println!("  {how}: {reason}");
    }
    if !info.reported.is_empty() {
        println!("  reported this round: {}", info.reported.join(", "));
    }
    println!("  latest model {}", info.latest_version());
}

pub async fn get_run_with(client: &mut AdminClient<Channel>, run: &str) -> Result<RunInfo> {
    let info = client
        .get_run(pb::GetRunRequest {
            run_id: run.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    Ok(RunInfo::try_from(info)?)
}

pub async fn run_status(kit: &Path, run: &str, json: bool) -> Result<()> {
    let mut client = admin_client(kit).await?;
    let info = get_run_with(&mut client, run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_run(&info);
    }
    Ok(())
}

pub async fn list_runs(kit: &Path) -> Result<()> {
    let mut client = admin_client(kit).await?;
    let runs = client
        .list_runs(pb::ListRunsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .runs;
    if runs.is_empty() {
        println!("no runs yet");
    }
    for run in runs {
        let run = RunInfo::try_from(run)?;
        println!(
            "{:<20} {:<10} {:>3}/{:<3} rounds  latest {}",
            run.run_id,
            run.state.as_str(),
            run.rounds.len(),
            run.config.rounds,
            &run.latest_version()[..12]
        );
    }
    Ok(())
}

/// The run's events, from its start, until it ends.
pub async fn events(
    client: &mut AdminClient<Channel>,
    run: &str,
) -> Result<impl Stream<Item = Result<RunEvent>> + use<>> {
    let stream = client
        .watch_run(pb::GetRunRequest {
            run_id: run.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    Ok(stream.map(|e| Ok(RunEvent::try_from(e.map_err(status)?)?)))
}

pub async fn watch(kit: &Path, run: &str) -> Result<()> {
    let mut client = admin_client(kit).await?;
    let mut events = std::pin::pin!(events(&mut client, run).await?);
    while let Some(event) = events.next().await {
        match event? {
            RunEvent::RoundStarted {
                round,
                model_version,
            } => {
                println!("round {round} started from model {}", &model_version[..12]);
            }
            RunEvent::UpdateAccepted { round, site } => {
                println!("round {round}: update from {site}")
            }
            RunEvent::RoundFinished(r) => println!(
                "round {} finished: {} sites, {} samples, loss {:.4}, train dice {:.3}, model {}{}",
                r.round,
                r.sites.len(),
                r.samples,
                r.loss,
                r.dice,
                &r.version[..12],
                r.epsilon
                    .map(|e| format!(", epsilon {e:.4}"))
                    .unwrap_or_default()
            ),
            RunEvent::RunFinished(info) => {
                println!("run {} {}", info.run_id, info.state.as_str());
            }
        }
    }
    Ok(())
}

pub async fn abort(kit: &Path, run: &str) -> Result<RunInfo> {
    let mut client = admin_client(kit).await?;
    let info = client
        .abort_run(pb::GetRunRequest {
            run_id: run.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    Ok(RunInfo::try_from(info)?)
}

fn format_time(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let ago = (alveolus_coordinator::clock::unix_ms() - unix_ms).max(0) / 1000;
    match ago {
        0..60 => format!("{ago} s ago"),
        60..3600 => format!("{} min ago", ago / 60),
        _ => format!("{} h ago", ago / 3600),
    }
}

pub async fn list_sites(kit: &Path) -> Result<()> {
    let mut client = admin_client(kit).await?;
    let sites = client
        .list_sites(pb::ListSitesRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .sites;
    if sites.is_empty() {
        println!("no site has connected yet");
    }
    for site in sites {
        let site = SiteInfo::from(site);
        let contributed: Vec<String> = site
            .contributions
            .iter()
            .map(|(run, rounds)| format!("{run}: rounds {}", compact_rounds(rounds)))
            .collect();
        println!(
            "{:<20} last contact {:<12} {}",
            site.name,
            format_time(site.last_contact_unix_ms),
            if contributed.is_empty() {
                "no contributions yet".to_string()
            } else {
                contributed.join("; ")
            }
        );
    }
    Ok(())
}

/// `1,2,3,5` -> `1-3,5`.
fn compact_rounds(rounds: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < rounds.len() {
        let mut j = i;
        while j + 1 < rounds.len() && rounds[j + 1] == rounds[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            rounds[i].to_string()
        } else {
            format!("{}-{}", rounds[i], rounds[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Downloads a model with a site or an admin kit, digest verified, and writes it and its
/// manifest.
pub async fn pull_model_to_file(kit_dir: &Path, version: &str, out: &Path) -> Result<()> {
    let kit = ClientKit::load(kit_dir)?;
    let request = pb::PullModelRequest {
        version: version.to_string(),
    };
    let channel = kit.connect().await?;
    let stream = match kit.identity.role {
        Role::Admin => AdminClient::new(channel).pull_model(request).await,
        _ => FederationClient::new(channel).pull_model(request).await,
    }
    .map_err(status)?
    .into_inner();
    let (header, bytes) = receive_model(stream, version).await?;
    Weights::decode(&bytes).context("the coordinator sent a model that does not parse")?;
    std::fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
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

pub async fn pull_model(
    client: &mut AdminClient<Channel>,
    version: &str,
) -> Result<(Weights, bytes::Bytes, String)> {
    let stream = client
        .pull_model(pb::PullModelRequest {
            version: version.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let (header, bytes) = receive_model(stream, version).await?;
    Ok((Weights::decode(&bytes)?, bytes, header.manifest_json))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rounds_are_compacted() {
        assert_eq!(super::compact_rounds(&[1, 2, 3, 5, 7, 8]), "1-3,5,7-8");
        assert_eq!(super::compact_rounds(&[]), "");
    }
}
