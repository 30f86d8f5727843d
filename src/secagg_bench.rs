//! `alveolus bench secagg`: what secure aggregation costs, against the same rounds aggregated
//! in the clear, in one process: a coordinator over real mTLS and N simulated sites that push
//! a fixed update of the demo model (no training, so the numbers are the protocol's own).
//! Optionally (`--dice`) the demo's final validation Dice with secure aggregation and DP at
//! two noise levels, against no DP.

use std::path::Path;
use std::time::Duration;

use alveolus_agent::secure;
use alveolus_agent::transport::{Traffic, push_update};
use alveolus_models::bench::median;
use alveolus_models::{ModelSpec, Weights};
use alveolus_proto::client::AdminClient;
use alveolus_proto::domain::{
    Metrics, RunConfig, RunState, SecureAggregationConfig, TrainingConfig,
};
use alveolus_proto::pb::federation_client::FederationClient;
use anyhow::{Context, Result, bail};
use clap::Args;
use tonic::transport::Channel;

use crate::simulated::{SimulatedFederation, fixed_update, push_plain, take_task};

/// What secure aggregation costs against aggregation in the clear: bytes per site and round
/// wall time with N simulated sites over mTLS; with --dice, the demo's final Dice with DP at the
/// given noise multipliers against no DP.
#[derive(Args)]
pub struct SecAggBenchOptions {
    /// Numbers of simulated sites, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "3,10,50")]
    pub sites: Vec<usize>,
    /// Rounds measured per setting (medians are printed).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// DP noise multipliers to run the demo at (comma separated); the demo also runs without
    /// DP as the peer, and the final Dice are compared.
    #[arg(long = "dice", value_delimiter = ',')]
    pub dice_noise: Option<Vec<f64>>,
    /// Demo rounds for --dice.
    #[arg(long, default_value_t = 6)]
    pub dice_rounds: u32,
    /// DP clip norm for --dice.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
}

/// One measured round.
struct Sample {
    sent: f64,
    received: f64,
    round_ms: f64,
}

pub async fn run(options: SecAggBenchOptions) -> Result<()> {
    if options.sites.iter().any(|&n| n < 2) || options.repeats == 0 {
        bail!("--sites must each be at least 2 and --repeats at least 1");
    }
    let mut sites = options.sites.clone();
    sites.sort_unstable();
    sites.dedup();
    let most = *sites.last().context("--sites is empty")?;
    let federation = SimulatedFederation::start(most)?;
    let mut admin = federation.admin().await?;

    let model = alveolus_models::network::initial_weights(&ModelSpec::small(), 7)?;
    let update = fixed_update(&model);
    println!(
        "secure aggregation against aggregation in the clear (the peer), demo model: {} values ({:.2} MiB as f32)",
        model.num_values(),
        model.num_values() as f64 * 4.0 / (1 << 20) as f64
    );
    println!(
        "{} simulated sites share this machine's cores; bytes are protobuf messages per site and round (update and protocol steps; the model download is the same in both and left out); medians of {} rounds",
        most, options.repeats
    );
    println!(
        "{:>5}  {:>9}  {:>12}  {:>12}  {:>12}  {:>6}  {:>9}  {:>9}  {:>6}",
        "sites",
        "threshold",
        "clear KiB",
        "secure sent",
        "secure recv",
        "bytes×",
        "clear ms",
        "secure ms",
        "time×"
    );
    let mut clients = Vec::new();
    for &n in &sites {
        while clients.len() < n {
            let name = federation.sites[clients.len()].clone();
            clients.push((name.clone(), federation.join(&name).await?));
        }
        let threshold = (2 * n).div_ceil(3).max(2) as u32;
        let mut clear = Vec::new();
        let mut masked = Vec::new();
        for _ in 0..options.repeats {
            clear.push(measure(&mut admin, &clients, &model, &update, None).await?);
            masked.push(measure(&mut admin, &clients, &model, &update, Some(threshold)).await?);
        }
        let med = |samples: &[Sample], f: fn(&Sample) -> f64| {
            median(&samples.iter().map(f).collect::<Vec<_>>())
        };
        let clear_bytes = med(&clear, |s| s.sent + s.received);
        let secure_bytes = med(&masked, |s| s.sent + s.received);
        let clear_ms = med(&clear, |s| s.round_ms);
        let secure_ms = med(&masked, |s| s.round_ms);
        println!(
            "{n:>5}  {threshold:>9}  {:>12.1}  {:>12.1}  {:>12.1}  {:>6.3}  {:>9.0}  {:>9.0}  {:>6.2}",
            clear_bytes / 1024.0,
            med(&masked, |s| s.sent) / 1024.0,
            med(&masked, |s| s.received) / 1024.0,
            secure_bytes / clear_bytes,
            clear_ms,
            secure_ms,
            secure_ms / clear_ms
        );
    }
    federation.stop()?;

    if let Some(noise) = options.dice_noise {
        dice_with_dp(&noise, options.dice_rounds, options.dp_clip).await?;
    }
    Ok(())
}

/// One single-round run with every site; returns the median site's traffic and the round's
/// wall time (run start to round finished, as the coordinator records it).
async fn measure(
    admin: &mut AdminClient,
    clients: &[(String, FederationClient<Channel>)],
    model: &Weights,
    update: &Weights,
    threshold: Option<u32>,
) -> Result<Sample> {
    let config = RunConfig {
        rounds: 1,
        min_sites: clients.len() as u32,
        deadline_seconds: 600,
        training: TrainingConfig::default(),
        secure_aggregation: threshold.map(|threshold| SecureAggregationConfig { threshold }),
        ..RunConfig::default()
    };
    let info = admin.start_run(config, model.encode()).await?;
    let mut playing = Vec::new();
    for (name, client) in clients {
        let (name, mut client, update) = (name.clone(), client.clone(), update.clone());
        playing.push(tokio::spawn(async move {
            let task = take_task(&mut client).await?;
            let mut traffic = Traffic::default();
            let metrics = Metrics {
                loss: 1.0,
                dice: 0.5,
            };
            if task.secure_aggregation.is_some() {
                let session = secure::join_round(&mut client, &task, &name, &mut traffic).await?;
                let words = secure::mask_update(&session, &update, metrics, 10, None)?;
                let (header, bytes) = secure::masked_message(&task, &words);
                push_update(&mut client, header, &bytes, &mut traffic).await?;
                secure::reveal(&mut client, &task, &session, &mut traffic).await?;
            } else {
                push_plain(&mut client, &task, &update, metrics, &mut traffic).await?;
            }
            anyhow::Ok(traffic)
        }));
    }
    let mut traffic = Vec::new();
    for p in playing {
        traffic.push(p.await??);
    }
    let finished = loop {
        let run = admin.run(&info.run_id).await?;
        if run.state != RunState::Running {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let round = finished
        .rounds
        .first()
        .with_context(|| format!("the benchmark run ended {}", finished.state.as_str()))?;
    Ok(Sample {
        sent: median(&traffic.iter().map(|t| t.sent as f64).collect::<Vec<_>>()),
        received: median(
            &traffic
                .iter()
                .map(|t| t.received as f64)
                .collect::<Vec<_>>(),
        ),
        round_ms: (round.finished_unix_ms - info.started_unix_ms) as f64,
    })
}

/// Runs `alveolus demo` with secure aggregation, without DP and at each noise multiplier, and
/// prints final validation Dice and ε against the run without DP.
async fn dice_with_dp(noise: &[f64], rounds: u32, clip: f64) -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    println!();
    println!(
        "final validation Dice of `alveolus demo --secure-aggregation` ({rounds} rounds, 3 hospitals), DP clip {clip}, against no DP (the peer)"
    );
    println!(
        "{:>10}  {:>10}  {:>14}  {:>6}",
        "noise z", "final Dice", "epsilon (1e-5)", "Dice×"
    );
    let mut settings: Vec<Option<f64>> = vec![None];
    settings.extend(noise.iter().copied().map(Some));
    let mut baseline = None;
    for (i, z) in settings.into_iter().enumerate() {
        let out = dir.path().join(format!("demo-{i}"));
        let mut args = vec![
            "demo".to_string(),
            "--out".into(),
            out.to_string_lossy().into_owned(),
            "--rounds".into(),
            rounds.to_string(),
            "--secure-aggregation".into(),
        ];
        if let Some(z) = z {
            args.extend([
                "--dp-clip".into(),
                clip.to_string(),
                "--dp-noise".into(),
                z.to_string(),
            ]);
        }
        let output = tokio::process::Command::new(&exe)
            .args(&args)
            .output()
            .await?;
        if !output.status.success() {
            bail!(
                "demo {} failed:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let (dice, epsilon) = final_dice(&out)?;
        let base = *baseline.get_or_insert(dice);
        println!(
            "{:>10}  {:>10.3}  {:>14}  {:>6.2}",
            z.map_or("none".into(), |z| z.to_string()),
            dice,
            epsilon.map_or("-".into(), |e| format!("{e:.1}")),
            dice / base
        );
    }
    Ok(())
}

fn final_dice(out: &Path) -> Result<(f64, Option<f64>)> {
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
    let last = report["rounds"]
        .as_array()
        .and_then(|r| r.last())
        .context("the demo report has no rounds")?;
    Ok((
        last["dice"].as_f64().context("no dice in the report")?,
        last["epsilon"].as_f64(),
    ))
}
