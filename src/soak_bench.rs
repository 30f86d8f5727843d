//! `alveolus bench soak`: one long run (300 rounds, 8 sites, the tiny model by default) through
//! a coordinator over real mTLS, printing every 25 rounds what would show a leak: the process's
//! resident memory and open file descriptors, the coordinator's live tasks, and the state
//! folder's size. It fails when memory, descriptors or tasks grow beyond the slack a steady
//! state needs, so that CI can run a short soak as a test.

use std::path::Path;
use std::time::{Duration, Instant};

use alveolus_agent::transport::{Traffic, pull_model};
use alveolus_models::ModelSpec;
use alveolus_proto::domain::{Metrics, RunConfig, RunState, TrainingConfig};
use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::simulated::{SimulatedFederation, fixed_update, push_plain, take_task};

/// A long run's resources, sampled every few rounds: they must stay flat.
#[derive(Args)]
pub struct SoakOptions {
    #[arg(long, default_value_t = 300)]
    pub rounds: u32,
    #[arg(long, default_value_t = 8)]
    pub sites: usize,
    /// Print a sample every this many rounds.
    #[arg(long, default_value_t = 25)]
    pub every: u32,
    /// Growth of resident memory allowed per round from the first sample to the last, in KiB
    /// (on top of 8 MiB for allocator arenas to settle). A run's record grows with its rounds,
    /// and every round rewrites it: about 6 KiB a round, and 1 KiB per site and round, measured
    /// (the round summaries, the events `run watch` replays, and the high-water mark of the
    /// buffers that serialise them).
    #[arg(long, default_value_t = 24.0)]
    pub max_rss_kib_per_round: f64,
}

/// What a leak would show in, at one moment.
struct Sample {
    round: usize,
    seconds: f64,
    rss_mib: f64,
    fds: usize,
    tasks: usize,
    state_mib: f64,
}

pub async fn run(options: SoakOptions) -> Result<()> {
    ensure!(
        options.rounds >= 2 * options.every && options.every > 0 && options.sites > 0,
        "--rounds must be at least twice --every (a first sample and a later one), and --every and --sites positive"
    );
    let federation = SimulatedFederation::start(options.sites)?;
    let mut admin = federation.admin().await?;
    let model = alveolus_models::network::initial_weights(&ModelSpec::tiny(), 5)?;
    let update = fixed_update(&model);
    let mut sites = Vec::new();
    for name in &federation.sites {
        let mut client = federation.join(name).await?;
        let update = update.clone();
        sites.push(tokio::spawn(async move {
            loop {
                let task = take_task(&mut client).await?;
                // What an agent does, without the training: the model is pulled and decoded.
                let _global = pull_model(&mut client, &task.model_version).await?;
                let metrics = Metrics {
                    loss: 0.5,
                    dice: 0.5,
                };
                push_plain(
                    &mut client,
                    &task,
                    &update,
                    metrics,
                    &mut Traffic::default(),
                )
                .await?;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        }));
    }
    let config = RunConfig {
        rounds: options.rounds,
        min_sites: options.sites as u32,
        deadline_seconds: 120,
        training: TrainingConfig::default(),
        ..RunConfig::default()
    };
    let run = admin.start_run(config, model.encode()).await?;
    println!(
        "soak: {} rounds, {} simulated sites, the tiny model ({} values); one process, the coordinator on its own runtime",
        options.rounds,
        options.sites,
        model.num_values()
    );
    println!(
        "{:>6}  {:>8}  {:>8}  {:>8}  {:>5}  {:>6}  {:>9}",
        "round", "seconds", "rounds/s", "RSS MiB", "fds", "tasks", "state MiB"
    );
    let state = federation.dir.path().join("state");
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next = options.every as usize;
    let finished = loop {
        let info = admin.run(&run.run_id).await?;
        if let Some(stopped) = sites.iter().position(|s| s.is_finished()) {
            sites.swap_remove(stopped).await??;
            bail!("a simulated site stopped");
        }
        if info.rounds.len() >= next {
            let sample = Sample {
                round: info.rounds.len(),
                seconds: started.elapsed().as_secs_f64(),
                rss_mib: rss_mib()?,
                fds: open_fds()?,
                tasks: federation.coordinator.metrics().num_alive_tasks(),
                state_mib: folder_bytes(&state) as f64 / f64::from(1 << 20),
            };
            let rate = samples
                .last()
                .map(|last| {
                    (sample.round - last.round) as f64 / (sample.seconds - last.seconds).max(1e-9)
                })
                .unwrap_or(sample.round as f64 / sample.seconds);
            println!(
                "{:>6}  {:>8.1}  {:>8.2}  {:>8.1}  {:>5}  {:>6}  {:>9.1}",
                sample.round,
                sample.seconds,
                rate,
                sample.rss_mib,
                sample.fds,
                sample.tasks,
                sample.state_mib
            );
            samples.push(sample);
            next += options.every as usize;
        }
        if info.state != RunState::Running {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for site in &sites {
        site.abort();
    }
    ensure!(
        finished.state == RunState::Completed && finished.rounds.len() == options.rounds as usize,
        "the soak run ended {} after {} of {} rounds",
        finished.state.as_str(),
        finished.rounds.len(),
        options.rounds
    );
    let (first, last) = (
        samples.first().context("no sample")?,
        samples.last().context("no sample")?,
    );
    let growth = last.rss_mib - first.rss_mib;
    println!(
        "from round {} to {}: RSS {:+.1} MiB ({:.1} KiB a round), fds {:+}, coordinator tasks {:+}",
        first.round,
        last.round,
        growth,
        growth * 1024.0 / (last.round - first.round).max(1) as f64,
        last.fds as i64 - first.fds as i64,
        last.tasks as i64 - first.tasks as i64
    );
    // Descriptors and tasks come and go with each site's calls in flight: a site's connection
    // streams, at most a long poll, a download and an upload each.
    let slack = options.sites;
    let allowed = 8.0 + options.max_rss_kib_per_round * (last.round - first.round) as f64 / 1024.0;
    ensure!(
        growth <= allowed,
        "resident memory grew {growth:.1} MiB over {} rounds (more than {allowed:.1} MiB)",
        last.round - first.round
    );
    ensure!(
        last.fds <= first.fds + slack,
        "open file descriptors grew from {} to {}",
        first.fds,
        last.fds
    );
    ensure!(
        last.tasks <= first.tasks + slack,
        "the coordinator's tasks grew from {} to {}",
        first.tasks,
        last.tasks
    );
    drop(admin);
    federation.stop()?;
    println!("flat: memory, descriptors and tasks stayed within their slack");
    Ok(())
}

fn rss_mib() -> Result<f64> {
    let bytes =
        alveolus_telemetry::process::resident_bytes().context("no VmRSS in /proc/self/status")?;
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

fn open_fds() -> Result<usize> {
    Ok(alveolus_telemetry::process::open_fds().context("/proc/self/fd does not read")? as usize)
}

fn folder_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => folder_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
