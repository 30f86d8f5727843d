//! `alveolus demo`: a throwaway project on this machine. A coordinator and three hospital
//! agents run as separate processes and speak mutual-TLS gRPC over loopback; each agent trains
//! on one block of the MedSeg slices (or, with `--synthetic`, on synthetic chest CTs written as
//! DICOM series), and after every round the global model is scored on slices no site trains on.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use alveolus_coordinator::provision::{ProvisionRequest, provision};
use alveolus_imaging::SliceDataset;
use alveolus_imaging::dataset::Purpose;
use alveolus_imaging::evaluate::evaluate;
use alveolus_imaging::synth::{SynthDataset, write_dataset};
use alveolus_models::{Device, ModelSpec, Weights};
use alveolus_proto::domain::{
    LearningRateSchedule, PrivacyConfig, RunConfig, RunEvent, RunState, SecureAggregationConfig,
    TrainingConfig,
};
use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt;
use tokio::process::{Child, Command};

use alveolus_proto::client::AdminClient;

const SITES: [&str; 3] = ["hospital-a", "hospital-b", "hospital-c"];
/// Slices at the end of each block that no site trains on; the global model is scored on them.
const HELD_OUT_PER_BLOCK: usize = 4;
/// Marks a folder as made by the demo, so that a rerun may clear it.
const MARKER: &str = ".alveolus-demo";

fn shipped_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("medseg")
}

/// `index,block,...` rows of manifest.csv.
fn read_blocks(data: &Path) -> Result<Vec<(String, usize)>> {
    let path = data.join("manifest.csv");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for (line_no, line) in text.lines().enumerate().skip(1) {
        let mut fields = line.split(',');
        let (Some(index), Some(block)) = (fields.next(), fields.next()) else {
            bail!(
                "{}:{}: expected index,block,...",
                path.display(),
                line_no + 1
            );
        };
        let index: usize = index
            .trim()
            .parse()
            .with_context(|| format!("{}:{}: bad index", path.display(), line_no + 1))?;
        let block: usize = block
            .trim()
            .parse()
            .with_context(|| format!("{}:{}: bad block", path.display(), line_no + 1))?;
        rows.push((format!("{index:03}.png"), block));
    }
    Ok(rows)
}

fn copy_slices(data: &Path, names: &[&String], dest: &Path) -> Result<()> {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(dest.join(sub))?;
        for name in names {
            let from = data.join(sub).join(name);
            std::fs::copy(&from, dest.join(sub).join(name))
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    Ok(())
}

fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        if !empty && !out.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by the demo; choose another --out",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(MARKER), b"made by alveolus demo; safe to delete\n")?;
    Ok(())
}

fn spawn(exe: &Path, args: &[&str], log: &Path, threads: Option<usize>) -> Result<Child> {
    let log_file = std::fs::File::create(log)?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true);
    if let Some(n) = threads {
        command.env("RAYON_NUM_THREADS", n.to_string());
    }
    Ok(command.spawn()?)
}

#[derive(serde::Serialize)]
struct RoundLine {
    round: u32,
    sites: usize,
    loss: f64,
    dice: f64,
    /// Per-class Dice of the global model on the held-out slices.
    ggo_dice: Option<f64>,
    consolidation_dice: Option<f64>,
    /// ε spent after the round, when the run has differential privacy.
    epsilon: Option<f64>,
    model: String,
}

/// Where the demo's sites get their data.
pub enum DemoData {
    /// MedSeg slices split by block (the shipped copy, or a folder of the same form).
    MedSeg(Option<PathBuf>),
    /// `alveolus data synth` chest CTs: DICOM series with NIfTI labels, different per site.
    Synthetic,
}

/// Each site's data under `out/data/SITE` and the held-out slices no site trains on.
fn prepare_data(out: &Path, data: DemoData) -> Result<SliceDataset> {
    let validation_dir = out.join("data").join("validation");
    match data {
        DemoData::MedSeg(data) => {
            let data = data.unwrap_or_else(shipped_data);
            // Split by block (consecutive slices often share a patient): one block per
            // hospital, the last slices of each block held out for validation.
            let rows = read_blocks(&data)?;
            let mut held_out = Vec::new();
            for (b, site) in SITES.iter().enumerate() {
                let block: Vec<&String> = rows
                    .iter()
                    .filter(|(_, blk)| *blk == b)
                    .map(|(n, _)| n)
                    .collect();
                if block.len() <= HELD_OUT_PER_BLOCK {
                    bail!("block {b} of {} has too few slices", data.display());
                }
                let (train, validation) = block.split_at(block.len() - HELD_OUT_PER_BLOCK);
                copy_slices(&data, train, &out.join("data").join(site))?;
                held_out.extend_from_slice(validation);
                println!("{site}: {} training slices (MedSeg block {b})", train.len());
            }
            copy_slices(&data, &held_out, &validation_dir)?;
        }
        DemoData::Synthetic => {
            let synth = |dir: &Path, seed: u64, cases: usize| {
                let dataset = SynthDataset {
                    cases,
                    seed,
                    ..SynthDataset::default()
                };
                write_dataset(dir, &dataset)
                    .with_context(|| format!("cannot write synthetic data to {}", dir.display()))
            };
            for (i, site) in SITES.iter().enumerate() {
                synth(&out.join("data").join(site), i as u64 + 1, 2)?;
                println!(
                    "{site}: 2 synthetic chest CTs as DICOM series (seed {})",
                    i + 1
                );
            }
            synth(&validation_dir, 100, 1)?;
        }
    }
    let validation =
        alveolus_imaging::dataset::load(&validation_dir, Purpose::Evaluation, false)?.slices;
    println!(
        "validation: {} held-out slices no site trains on",
        validation.len()
    );
    Ok(validation)
}

/// Everything on one machine: a coordinator and three hospital agents over real mTLS.
#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// MedSeg slice folder; defaults to the copy shipped with the project.
    #[arg(long, conflicts_with = "synthetic")]
    data: Option<PathBuf>,
    /// Give each hospital synthetic chest CTs (DICOM series and NIfTI labels, made by
    /// `data synth`) instead of MedSeg slices.
    #[arg(long)]
    synthetic: bool,
    /// Run with differential privacy (DP-FedAvg): the clip norm of each site's update.
    #[arg(long, requires = "dp_noise")]
    dp_clip: Option<f64>,
    /// DP noise multiplier (noise std over the clip norm).
    #[arg(long, requires = "dp_clip")]
    dp_noise: Option<f64>,
    /// Aggregate securely: the coordinator sees only the sum of the hospitals' updates.
    #[arg(long)]
    secure_aggregation: bool,
}

pub async fn run_demo(args: DemoArgs) -> Result<()> {
    let data = if args.synthetic {
        DemoData::Synthetic
    } else {
        DemoData::MedSeg(args.data)
    };
    let privacy = crate::cli::run::privacy_config(args.dp_clip, args.dp_noise, 1e-5, None);
    run(
        &args.out,
        args.rounds,
        data,
        privacy,
        args.secure_aggregation,
    )
    .await
}

pub async fn run(
    out: &Path,
    rounds: u32,
    data: DemoData,
    privacy: Option<PrivacyConfig>,
    secure_aggregation: bool,
) -> Result<()> {
    let started = Instant::now();
    prepare_out(out)?;
    let out = out.canonicalize()?;
    let validation = prepare_data(&out, data)?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let project = out.join("project");
    provision(&ProvisionRequest {
        project: "demo".into(),
        coordinator: format!("127.0.0.1:{port}"),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        admins: vec!["researcher".into()],
        out: project.clone(),
        validity_days: 30,
    })?;
    println!("provisioned a project CA and kits in {}", project.display());

    let exe = std::env::current_exe()?;
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    let mut children = vec![spawn(
        &exe,
        &[
            "coordinator",
            "--kit",
            &path(project.join("coordinator")),
            "--state",
            &path(out.join("state")),
        ],
        &logs.join("coordinator.log"),
        None,
    )?];
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    for site in SITES {
        children.push(spawn(
            &exe,
            &[
                "agent",
                "--kit",
                &path(project.join("sites").join(site)),
                "--data",
                &path(out.join("data").join(site)),
            ],
            &logs.join(format!("{site}.log")),
            // Three trainers share the cores; one thread each avoids oversubscription.
            Some((cores / SITES.len()).max(1)),
        )?);
    }
    println!(
        "started a coordinator on 127.0.0.1:{port} and {} agents (logs in {})",
        SITES.len(),
        logs.display()
    );

    let admin_kit = project.join("admins").join("researcher");
    let mut client = connect_with_retry(&admin_kit).await?;
    let spec = ModelSpec::small();
    let seed = 7;
    let initial = alveolus_models::network::initial_weights(&spec, seed)?;
    let device = Device::flex();
    let initial_dice = score(&initial, &validation, &device)?;
    let config = RunConfig {
        rounds,
        min_sites: SITES.len() as u32,
        deadline_seconds: 300,
        training: TrainingConfig {
            local_epochs: 2,
            learning_rate: 3e-3,
            batch_size: 4,
            seed,
            ..TrainingConfig::default()
        },
        privacy,
        // Every hospital must see each round through: the coordinator unmasks only the sum of all.
        secure_aggregation: secure_aggregation.then_some(SecureAggregationConfig {
            threshold: SITES.len() as u32,
        }),
        // Measured on the shipped MedSeg blocks: at a constant rate the global model's Dice
        // swings by 0.1 from round to round; decaying the rate settles it (0.45 after 6 rounds
        // at 3e-3 constant, 0.64 after 20 with this schedule; 0.45 after 14 at 5e-3).
        schedule: Some(LearningRateSchedule {
            warmup_rounds: 1,
            cosine: true,
            final_fraction: 0.1,
        }),
        ..RunConfig::default()
    };
    let info = client.start_run(config, initial.encode()).await?;
    println!(
        "run {} started: {rounds} rounds, {} px U-Net, initial model dice {:.3}",
        info.run_id, spec.image_size, initial_dice.0
    );
    if secure_aggregation {
        println!("secure aggregation: the coordinator sees only the sum of the three updates");
    }
    println!("round  sites  mean local loss  validation dice (infection)");

    let mut lines = Vec::new();
    let mut final_version = None;
    let mut events = std::pin::pin!(client.clone().events(&info.run_id).await?);
    while let Some(event) = events.next().await {
        for child in &mut children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "a demo process exited early ({status}); see the logs in {}",
                    logs.display()
                );
            }
        }
        match event? {
            RunEvent::RoundFinished(summary) => {
                let (_, bytes) = client.pull_model(&summary.version).await?;
                let weights = Weights::decode(&bytes)?;
                let (dice, ggo, consolidation) = score(&weights, &validation, &device)?;
                println!(
                    "{:>5}  {:>5}  {:>15.4}  {:.3}{}",
                    summary.round,
                    summary.sites.len(),
                    summary.loss,
                    dice,
                    summary
                        .epsilon
                        .map(|e| format!("  (epsilon {e:.3})"))
                        .unwrap_or_default()
                );
                lines.push(RoundLine {
                    round: summary.round,
                    sites: summary.sites.len(),
                    loss: summary.loss,
                    dice,
                    ggo_dice: ggo,
                    consolidation_dice: consolidation,
                    epsilon: summary.epsilon,
                    model: summary.version.clone(),
                });
                final_version = Some(summary.version);
            }
            RunEvent::RunFinished(info) => {
                if info.state != RunState::Completed {
                    bail!(
                        "the run ended {}{}",
                        info.state.as_str(),
                        info.stop_reason
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                }
                break;
            }
            _ => {}
        }
    }
    let version = final_version.context("the run finished without a round")?;
    let (header, bytes) = client.pull_model(&version).await?;
    let manifest = header.manifest_json;
    let model_path = out.join("final-model.safetensors");
    std::fs::write(&model_path, &bytes)?;
    std::fs::write(out.join("final-model.json"), manifest)?;
    let report = serde_json::json!({
        "run_id": info.run_id,
        "secure_aggregation": secure_aggregation,
        "privacy": info.config.privacy,
        "initial_dice": initial_dice.0,
        "validation_slices": validation.len(),
        "rounds": lines,
        "final_model": version,
        "seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    let (_, written) =
        alveolus_dashboard::write_report(&admin_kit, &info.run_id, &out.join("report")).await?;
    if let Some(peak) = children[0].id().and_then(peak_rss_bytes) {
        println!(
            "coordinator peak memory (RSS): {:.1} MiB; model size: {:.2} MiB ({} bytes)",
            peak as f64 / (1 << 20) as f64,
            bytes.len() as f64 / (1 << 20) as f64,
            bytes.len()
        );
    }
    for child in &mut children {
        let _ = child.start_kill();
    }
    println!("final model: {} (manifest beside it)", model_path.display());
    println!("report:      {}", written.html.display());
    println!(
        "             (plots beside it; validation Dice per round in {})",
        out.join("report.json").display()
    );
    println!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Peak resident memory of a process, where the platform tells it (Linux: VmHWM).
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Infection, GGO and consolidation Dice of a model on the held-out slices.
fn score(
    weights: &Weights,
    data: &SliceDataset,
    device: &Device,
) -> Result<(f64, Option<f64>, Option<f64>)> {
    let report = evaluate(weights, data, device)?;
    let class = |name: &str| {
        report
            .per_class
            .iter()
            .find(|s| s.class == name)
            .and_then(|s| s.dice)
    };
    Ok((
        report.infection.unwrap_or(0.0),
        class("ggo"),
        class("consolidation"),
    ))
}

async fn connect_with_retry(kit: &Path) -> Result<AdminClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match AdminClient::connect(kit).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("coordinator not up yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::from(e).context("the demo coordinator did not come up"));
            }
        }
    }
}
