//! `alveolus simulate`: a federated run in one process, for research. The coordinator's own
//! round engine (the `Coordinator` a real coordinator serves, with its state folder, strategies
//! and validation) and the sites' own round work (`agent::local`: the update, FedProx, FedBN,
//! DP's clip, the validation figures) meet without certificates, gRPC or a network: each site
//! takes its task from the engine, trains in turn on the shared thread pool, and hands the
//! engine its update as an agent's upload would. Every site takes part in every round, in a
//! fixed order, so a run is reproducible from its `--seed`; its record is the one `run status
//! --json` prints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alveolus_agent::SiteData;
use alveolus_agent::local::{local_update, measure, no_validation};
use alveolus_agent::site_data::load_validation;
use alveolus_agent::site_norms::SiteNorms;
use alveolus_coordinator::engine::{Coordinator, EngineSettings};
use alveolus_imaging::SliceDataset;
use alveolus_imaging::dataset::{Purpose, load};
use alveolus_models::{Device, DeviceChoice, LabelledSlice, ModelSpec};
use alveolus_proto::domain::{
    EvaluateTask, RunInfo, RunState, Task, TrainTask, UpdateHeader, ValidationReport,
};
use alveolus_proto::weights::Weights;
use anyhow::{Context, Result, bail};
use clap::Args;

use crate::cli::run::{RunArgs, print_run};

mod split;

use split::SplitKind;

/// Run federated rounds over local site folders in one process: the coordinator's engine and
/// the sites' training without certificates or network, reproducible from --seed.
#[derive(Args)]
pub struct SimulateArgs {
    /// A site's data (a `dataset.toml`, a folder holding one, or a PNG slice folder), as
    /// NAME=PATH or PATH (named after its folder); once per site.
    #[arg(long = "site", required_unless_present = "data")]
    sites: Vec<String>,
    /// Instead of --site: one dataset's `train` cases split between --split-sites sites
    /// (named site-1, site-2, ...); each measures on the dataset's `validation` cases.
    #[arg(long, conflicts_with = "sites", requires = "split_sites")]
    data: Option<PathBuf>,
    /// How many sites --data is split between.
    #[arg(long, requires = "data")]
    split_sites: Option<usize>,
    /// How --data is split: blocks (contiguous in the dataset's order), iid (at random), or
    /// dirichlet (label skew: slices with consolidation, with only ground-glass and without
    /// lesion dealt out in Dirichlet(--alpha) proportions). Seeded by --seed.
    #[arg(long, value_enum, default_value = "iid", requires = "data")]
    split: SplitKind,
    /// The Dirichlet split's concentration: small values give each site few kinds of slice,
    /// large ones an even mix.
    #[arg(long, default_value_t = 0.5, requires = "data")]
    alpha: f64,
    /// An empty (or new) folder for the run's state (checkpoints and run log), its record
    /// (`run.json`, as `run status --json`) and its final model.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    #[command(flatten)]
    run: RunArgs,
}

/// A simulated site: its data and, under FedBN, its own normalisation layers.
struct Site {
    name: String,
    training: SliceDataset,
    /// Its validation slices and how many cases they are, if it has any.
    validation: Option<(Arc<SliceDataset>, usize)>,
    norms: SiteNorms,
}

pub async fn simulate(args: SimulateArgs) -> Result<()> {
    let (mut config, weights) = args.run.config_and_model()?;
    if config.secure_aggregation.is_some() {
        bail!(
            "simulate aggregates in the clear: secure aggregation changes who sees the updates, not the model (up to its fixed-point rounding); leave out --secure-aggregation"
        );
    }
    let mut sites = match &args.data {
        Some(data) => split_sites(
            data,
            args.split_sites.unwrap_or_default(),
            args.split,
            args.alpha,
            args.run.seed,
        )?,
        None => load_sites(&args.sites)?,
    };
    // Every site in every round, however the flags set the quorum: a simulation has no site
    // that drops out.
    config.min_sites = sites.len() as u32;
    let state = prepare_out(&args.out)?;
    let device = args.device.resolve()?;
    let spec = ModelSpec::from_weights(&weights)?;
    eprintln!(
        "simulating {} rounds of {} sites on {device}: {} ({} px)",
        config.rounds,
        sites.len(),
        spec.kind,
        spec.image_size
    );
    if let Some(caution) = device.precision_caution(config.training.precision) {
        eprintln!("note: {caution}");
    }
    let coordinator = Coordinator::open(EngineSettings {
        project: "simulation".into(),
        state_dir: state,
        upload_slots: sites.len(),
        max_model_bytes: u64::MAX,
        max_long_poll: Duration::from_secs(1),
    })?;
    let info = coordinator.start_run(config, &weights.encode()).await?;
    let run_id = info.run_id.clone();
    let slices: Vec<_> = sites
        .iter()
        .map(|s| Arc::new(s.training.at_size(spec.image_size)))
        .collect();
    let mut reported = 0;
    let mut idle = Duration::ZERO;
    while coordinator.run(&run_id)?.state == RunState::Running {
        let mut worked = false;
        for (index, site) in sites.iter_mut().enumerate() {
            loop {
                let task = coordinator.next_task(&site.name, idle).await;
                idle = Duration::ZERO;
                match task {
                    Task::Wait { .. } => break,
                    Task::Evaluate(task) => {
                        worked = true;
                        site.evaluate(&coordinator, task, &device.device).await?;
                    }
                    Task::Train(task) => {
                        worked = true;
                        site.train(&coordinator, task, &slices[index], &device.device)
                            .await?;
                        // The site's next task is the next round's: the round closes once
                        // every site has reported.
                        break;
                    }
                }
            }
        }
        let info = coordinator.run(&run_id)?;
        for round in info.rounds.iter().skip(reported) {
            eprintln!(
                "round {:>3}: loss {:.4}, train dice {:.3}",
                round.round, round.loss, round.dice
            );
        }
        reported = info.rounds.len();
        // Nothing to do: the round is being written; wait for the engine's next task.
        idle = if worked {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        };
    }
    finish(&coordinator, &run_id, &args.out)
}

impl Site {
    /// An evaluate task: the round's model (with the site's own normalisation under FedBN)
    /// measured on the site's validation cases and reported, as an agent does.
    async fn evaluate(
        &self,
        coordinator: &Arc<Coordinator>,
        task: EvaluateTask,
        device: &Device,
    ) -> Result<()> {
        let validation = match &self.validation {
            None => no_validation(),
            Some((validation, cases)) => {
                let mut model = pulled(coordinator, &task.model_version)?;
                if task.site_normalisation {
                    self.norms.personalise(&task.run_id, &mut model);
                }
                let (validation, cases, device) = (validation.clone(), *cases, device.clone());
                tokio::task::spawn_blocking(move || measure(&model, &validation, cases, &device))
                    .await??
            }
        };
        let report = ValidationReport {
            run_id: task.run_id,
            round: task.round,
            model_version: task.model_version,
            validation,
        };
        coordinator.accept_validation(&self.name, report).await?;
        Ok(())
    }

    /// A train task: the round's update made from `slices` and handed to the engine, as an
    /// agent's upload would be.
    async fn train(
        &mut self,
        coordinator: &Arc<Coordinator>,
        task: TrainTask,
        slices: &Arc<Vec<LabelledSlice>>,
        device: &Device,
    ) -> Result<()> {
        let mut global = pulled(coordinator, &task.model_version)?;
        if task.training.site_normalisation {
            self.norms.personalise(&task.run_id, &mut global);
        }
        let (slices, device, for_training) = (slices.clone(), device.clone(), task.clone());
        let started = std::time::Instant::now();
        let local = tokio::task::spawn_blocking(move || {
            local_update(&global, &slices, &for_training, &device, |_| {})
        })
        .await?
        .with_context(|| format!("site {}", self.name))?;
        if task.training.site_normalisation {
            self.norms = SiteNorms::keep(&task.run_id, &local.local);
        }
        let header = UpdateHeader {
            run_id: task.run_id.clone(),
            round: task.round,
            base_version: task.model_version.clone(),
            num_samples: local.samples as u64,
            metrics: local.metrics,
            total_bytes: local.update.encoded_len() as u64,
            masked: false,
            // As an agent: not under DP, where it would hint at the sample count.
            train_seconds: task
                .clip_norm
                .is_none()
                .then(|| started.elapsed().as_secs_f64()),
        };
        coordinator
            .accept_update(&self.name, &header, &local.update)
            .with_context(|| format!("site {}'s update", self.name))?;
        Ok(())
    }
}

/// The sites named on the command line, their data loaded; a name given twice, or data that
/// do not load, is refused before anything runs.
fn load_sites(specs: &[String]) -> Result<Vec<Site>> {
    let mut sites: Vec<Site> = Vec::new();
    for spec in specs {
        let (name, path) = match spec.split_once('=') {
            Some((name, path)) => (name.to_string(), PathBuf::from(path)),
            None => {
                let path = PathBuf::from(spec);
                let folder = if path.is_file() {
                    path.parent().map(Path::to_path_buf).unwrap_or_default()
                } else {
                    path.clone()
                };
                let name = folder
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .with_context(|| format!("--site {spec}: name the site as NAME=PATH"))?;
                (name, path)
            }
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("--site {spec}: the name `{name}` must be letters, digits, '-', '_' or '.'");
        }
        if sites.iter().any(|s| s.name == name) {
            bail!("--site {spec}: two sites are named `{name}`; name them as NAME=PATH");
        }
        let (data, _) = SiteData::load(&path, false)
            .with_context(|| format!("site {name} ({})", path.display()))?;
        sites.push(Site::new(
            name,
            data.slices().clone(),
            data.validation().cloned(),
        ));
    }
    Ok(sites)
}

/// `count` sites made of one dataset's training cases, split as `kind` says; each measures
/// on all of the dataset's validation cases.
fn split_sites(
    path: &Path,
    count: usize,
    kind: SplitKind,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Site>> {
    let loaded = load(path, Purpose::Training, false)
        .with_context(|| format!("--data {}", path.display()))?;
    let slices = loaded.slices.slices;
    let parts = split::assign(&slices, count, kind, alpha, seed)
        .map_err(|e| anyhow::anyhow!("--data {}: {e}", path.display()))?;
    let validation = load_validation(path, false);
    Ok(parts
        .into_iter()
        .enumerate()
        .map(|(index, part)| {
            let training = SliceDataset {
                slices: part.into_iter().map(|i| slices[i].clone()).collect(),
            };
            Site::new(format!("site-{}", index + 1), training, validation.clone())
        })
        .collect())
}

impl Site {
    fn new(
        name: String,
        training: SliceDataset,
        validation: Option<(Arc<SliceDataset>, usize)>,
    ) -> Self {
        eprintln!(
            "{name}: {} training slices, {} validation cases",
            training.len(),
            validation.as_ref().map_or(0, |(_, cases)| *cases)
        );
        Self {
            name,
            training,
            validation,
            norms: SiteNorms::default(),
        }
    }
}

/// The state folder inside `out`, which must be empty or new: a simulation never writes over
/// an earlier one.
fn prepare_out(out: &Path) -> Result<PathBuf> {
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("--out {}", out.display()))?
            .next()
            .is_some()
    {
        bail!(
            "--out {} is not empty; give a new or empty folder",
            out.display()
        );
    }
    let state = out.join("state");
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    Ok(state)
}

/// A model of the run, as a site would pull it.
fn pulled(coordinator: &Coordinator, version: &str) -> Result<Weights> {
    let (bytes, _) = coordinator.model(version)?;
    Ok(Weights::decode(&bytes)?)
}

/// Writes the run's record and final model beside its state, and prints the record as `run
/// status` does.
fn finish(coordinator: &Coordinator, run_id: &str, out: &Path) -> Result<()> {
    let info: RunInfo = coordinator.run(run_id)?;
    let record = out.join("run.json");
    std::fs::write(&record, serde_json::to_string_pretty(&info)?)
        .with_context(|| format!("cannot write {}", record.display()))?;
    let (bytes, _) = coordinator.model(info.latest_version())?;
    let model = out.join("final-model.safetensors");
    std::fs::write(&model, &bytes).with_context(|| format!("cannot write {}", model.display()))?;
    print_run(&info);
    if info.state != RunState::Completed {
        bail!(
            "the run ended {}{}",
            info.state.as_str(),
            info.stop_reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    println!(
        "record {}, final model {}",
        record.display(),
        model.display()
    );
    Ok(())
}
